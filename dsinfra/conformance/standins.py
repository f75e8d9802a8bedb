"""CPU stand-ins for the CUDA-only helpers DeepSeek's tests call: no-ops for
device management, a Hopper's identity, NCCL's form of one collective that
gloo lacks, and wall-clock timers in place of CUDA events, CUPTI (kineto)
profiles and ``triton.testing.do_bench``.

Every timer runs the function it times exactly once (the GPU helpers run it
tens of times to average out noise) and returns the wall-clock time in the
shape and unit the helper it replaces returns. Timers feed the tests' printed
figures only, never a check.

:func:`patch` installs stand-ins by dotted name; the conformance runner puts a
call to it at the top of every upstream file it runs.
"""

from __future__ import annotations

import importlib
import os
import time
import types
from collections.abc import Callable, Mapping


def no_op(*args, **kwargs) -> None:
    """For ``torch.cuda.synchronize``, ``set_device``, ``manual_seed``, ...: nothing to do on a CPU."""


def stay_on_cpu(self, *args, **kwargs):
    """For ``torch.Tensor.cuda``: the tensor, where it is."""
    return self


def hopper_capability(*args, **kwargs) -> tuple[int, int]:
    """For ``torch.cuda.get_device_capability``: sm90, the GPUs the tests were written for."""
    return 9, 0


def device_count() -> int:
    """For ``torch.cuda.device_count``: how many ranks a test that spawns one
    per GPU gets (``DSINFRA_CONFORMANCE_DEVICES``, default 8, one node's worth)."""
    return int(os.environ.get("DSINFRA_CONFORMANCE_DEVICES", "8"))


def all_gather_into_tensor(output_tensor, input_tensor, group=None, async_op=False):
    """For ``torch.distributed.all_gather_into_tensor``: NCCL also takes the
    ranks' tensors stacked (``[world_size, *input.shape]``), gloo only
    concatenated along the first dimension; a stacked output is passed as the
    concatenated view of the same memory."""
    from torch.distributed import distributed_c10d

    if output_tensor.dim() == input_tensor.dim() + 1:
        output_tensor = output_tensor.view(-1, *output_tensor.shape[2:])
    return distributed_c10d.all_gather_into_tensor(output_tensor, input_tensor, group, async_op)


def _seconds(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


class WallClockEvent:
    """For ``torch.cuda.Event``: records the wall clock."""

    def __init__(self, *args, **kwargs):
        self.when: float | None = None

    def record(self, *args, **kwargs) -> None:
        self.when = time.perf_counter()

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True

    def wait(self, *args, **kwargs) -> None:
        pass

    def elapsed_time(self, end: WallClockEvent) -> float:
        """Milliseconds from this event to ``end``, as CUDA events report them."""
        return (end.when - self.when) * 1e3


def do_bench(fn: Callable[[], object], *args, **kwargs) -> float:
    """For ``triton.testing.do_bench``: milliseconds per run."""
    return _seconds(fn) * 1e3


def bench(fn: Callable[[], object], num_warmups: int = 0, num_tests: int = 1, post_fn=None) -> tuple[float, float, float]:
    """For DeepEP's tests' ``bench``: (average, min, max) seconds per run."""
    seconds = _seconds(fn)
    if post_fn is not None:
        post_fn()
    return seconds, seconds, seconds


def bench_seconds(fn: Callable[[], object], *args, **kwargs) -> float:
    """For ``deep_gemm.testing.bench``: seconds per run."""
    return _seconds(fn)


def bench_kineto(fn: Callable[[], object], kernel_names, *args, num_kernels_per_period: int = 1, **kwargs):
    """For DeepGEMM's and DeepEP's ``bench_kineto``: seconds per run of each
    named kernel, shaped as DeepEP's are (see
    :func:`dsinfra.testing.timing.kernel_times`). The wall clock cannot
    tell kernels apart: each gets the whole run's time (in equal parts when a
    run launches it ``num_kernels_per_period`` times)."""
    from dsinfra.testing.timing import kernel_times

    return kernel_times(_seconds(fn), kernel_names, num_kernels_per_period)


class WholeRun(str):
    """The one "kernel" the wall clock sees, the whole run: every kernel is part
    of it (``name in WholeRun()`` is true for any name)."""

    def __new__(cls):
        return super().__new__(cls, "whole run (wall clock)")

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str)


class WallClockProfile:
    """What FlashMLA's ``kernelkit.bench_kineto`` returns, from the wall clock:
    every kernel, and every span of kernels, took the whole run. Its kernel
    names are one :class:`WholeRun`, so FlashMLA's search for a kernel by name
    (``[name in s for s in get_kernel_names()]``) finds each exactly once."""

    def __init__(self, seconds: float):
        self.seconds = seconds

    def get_kernel_names(self) -> list[str]:
        return [WholeRun()]

    def get_kernel_time(self, name: str) -> float:
        return self.seconds

    def get_kernel_times(self, names, *args, **kwargs) -> list[float]:
        return [self.seconds for _ in names]

    def get_e2e_time(self, first: str, last: str) -> float:
        return self.seconds


def kernelkit_bench_kineto(fn: Callable[[], object], *args, **kwargs) -> WallClockProfile:
    """For FlashMLA's ``kernelkit.bench_kineto``."""
    return WallClockProfile(_seconds(fn))


def bench_by_events(kernels, *args, **kwargs):
    """For FlashMLA's ``kernelkit.bench_by_cuda_events``: seconds per run of
    each kernel (a single callable gets a single time)."""
    if callable(kernels):
        return _seconds(kernels)
    return [_seconds(kernel) for kernel in kernels]


def patch(stand_ins: Mapping[str, str]) -> None:
    """Replace each dotted name (``"torch.cuda.synchronize"``) with the
    stand-in of this module named beside it (a function: a copy of its own,
    since torch's compiler keys its rules by function object and refuses one
    object under two of torch's names). A name whose module cannot be
    imported is left alone: the test meets the missing module itself."""
    here = globals()
    for target, name in stand_ins.items():
        owner = _owner(target)
        if owner is None:
            continue
        stand_in = here[name]
        if isinstance(stand_in, types.FunctionType):
            original = stand_in
            stand_in = types.FunctionType(original.__code__, original.__globals__, original.__name__, original.__defaults__)
            stand_in.__kwdefaults__ = original.__kwdefaults__  # keyword-only defaults are not copied with the code
        setattr(owner, target.rpartition(".")[2], stand_in)


def _owner(target: str):
    """The object holding the last part of ``target``: the longest importable
    module prefix, then attributes; None if there is none."""
    parts = target.split(".")[:-1]
    for split in range(len(parts), 0, -1):
        try:
            owner = importlib.import_module(".".join(parts[:split]))
        except ImportError:
            continue
        for name in parts[split:]:
            owner = getattr(owner, name, None)
            if owner is None:
                return None
        return owner
    return None
