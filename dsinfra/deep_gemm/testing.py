"""DeepGEMM's ``deep_gemm.testing`` helpers: numerics, test filters and timing.

The numerics are DeepGEMM's (:func:`calc_diff`, :func:`count_bytes`,
:func:`assert_bitwise_equal`). The timings differ: :func:`bench` and
:func:`bench_kineto` time the whole call by the wall clock (synchronising a GPU
around it) and flush no cache, where DeepGEMM reads per-kernel times from CUDA
events and the profiler; :func:`bench_kineto` gives that one time for each
kernel name asked for.
"""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Callable

import torch

from dsinfra.testing import calc_diff, count_bytes
from dsinfra.testing.timing import kernel_times, synchronize

__all__ = [
    "assert_bitwise_equal",
    "bench",
    "bench_kineto",
    "calc_diff",
    "count_bytes",
    "get_arch_major",
    "ignore_env",
    "test_filter",
]

CPU_ARCH_MAJOR = 9  # off a GPU, dsinfra takes DeepGEMM's SM90 (Hopper) choices


def assert_bitwise_equal(x: torch.Tensor, y: torch.Tensor, label: str = "") -> None:
    """Raise AssertionError, naming the first differing element, unless x and y have
    one shape, one dtype and the same bytes."""
    suffix = f" ({label})" if label else ""
    if x.shape != y.shape or x.dtype != y.dtype:
        raise AssertionError(f"bitwise mismatch{suffix}: {x.dtype} {list(x.shape)} vs {y.dtype} {list(y.shape)}")
    x_bytes = x.contiguous().view(-1).view(torch.uint8)
    y_bytes = y.contiguous().view(-1).view(torch.uint8)
    different = (x_bytes != y_bytes).nonzero()
    if different.numel():
        element = int(different[0]) // x.element_size()
        raise AssertionError(
            f"bitwise mismatch{suffix}: {different.numel()} of {x_bytes.numel()} bytes differ, the first in element "
            f"{element}: {x.reshape(-1)[element].item()} vs {y.reshape(-1)[element].item()}"
        )


def get_arch_major() -> int:
    """The CUDA compute capability's major version of the current GPU; without one,
    9: dsinfra then follows DeepGEMM's SM90 choices (float32 scales, no FP4)."""
    return torch.cuda.get_device_capability()[0] if torch.cuda.is_available() else CPU_ARCH_MAJOR


def test_filter(condition: Callable[[], bool]):
    """Decorate a test to run only when ``condition()`` holds (else it prints why not)."""

    def decorator(func):
        @functools.wraps(func)
        def wrapper(*args, **kwargs):
            if condition():
                return func(*args, **kwargs)
            print(f"{func.__name__}:\n > Filtered by {condition}\n")

        return wrapper

    return decorator


def ignore_env(name: str, condition: Callable[[], bool]):
    """Decorate a test to run with environment variable ``name`` unset when ``condition()`` holds."""

    def decorator(func):
        @functools.wraps(func)
        def wrapper(*args, **kwargs):
            saved = os.environ.pop(name, None) if condition() else None
            try:
                return func(*args, **kwargs)
            finally:
                if saved is not None:
                    os.environ[name] = saved

        return wrapper

    return decorator


def bench(fn: Callable[[], object], num_warmups: int = 5, num_tests: int = 10, high_precision: bool = False) -> float:
    """Seconds per call of ``fn``: the wall-clock mean of ``num_tests`` calls after
    ``num_warmups`` (``high_precision`` is accepted and has no effect)."""
    for _ in range(num_warmups):
        fn()
    synchronize()
    start = time.perf_counter()
    for _ in range(num_tests):
        fn()
    synchronize()
    return (time.perf_counter() - start) / max(num_tests, 1)


def bench_kineto(fn: Callable[[], object], kernel_names: str | tuple[str, ...], num_tests: int = 30, **_ignored) -> float | tuple:
    """DeepGEMM's per-kernel timer, by the wall clock: seconds per call of ``fn``
    (after one warm-up call), given once per name in ``kernel_names`` (a tuple for a
    tuple). Profiler options (``suppress_kineto_output``, ``trace_path``,
    ``flush_l2``, ``barrier``, ...) are accepted and ignored."""
    return kernel_times(bench(fn, num_warmups=1, num_tests=num_tests), kernel_names)
