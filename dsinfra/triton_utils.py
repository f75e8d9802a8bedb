"""What every Triton kernel in dsinfra needs.

Import this only from modules that hold Triton kernels: it imports Triton.

- :func:`dot`. Under ``TRITON_INTERPRET=1`` (kernels on CPU tensors, as the tests
  run them) Triton's interpreter computes ``tl.dot`` on bfloat16 operands wrongly
  (seen with Triton 3.9; fp16, fp32 and fp8 operands are right). Kernels therefore
  call :func:`dot` instead of ``tl.dot``: it upcasts bfloat16 operands to float32
  when interpreting and is exactly ``tl.dot`` when compiled for a GPU.
- :class:`Target` and :func:`target_for`: the GPU a launch is for (architecture,
  multiprocessors, shared memory per program), from which each wrapper picks its
  tile sizes. :data:`TARGETS` holds the four that ``python -m dsinfra kernels``
  compiles for; :func:`targeting` makes wrappers pick for one of them wherever
  they run (the interpreter included, which is how the tests run each target's
  configuration on a CPU).
- :func:`launch` and :func:`capturing`: wrappers launch through :func:`launch`, so
  that the ``kernels`` report can record the launches a call would make (on
  ``meta`` tensors, no memory, no GPU) and compile exactly those.
- :class:`CompileCase`: what a kernel module lists in its ``compile_cases(target)``
  for the report (docs/backend.md, "Compiling for GPUs you do not have").
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import os
import re
from collections.abc import Iterator
from typing import Any

import torch
import triton
import triton.language as tl

from dsinfra import backend

INTERPRETING = tl.constexpr(backend.interpreting())


@triton.jit
def dot(a, b, acc):
    """``acc + a @ b`` (``tl.dot``), correct under the interpreter for bf16 operands."""
    if INTERPRETING:
        if a.dtype == tl.bfloat16 or b.dtype == tl.bfloat16:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
    return tl.dot(a, b, acc)


E4M3_DECODED_SCALE = tl.constexpr(256.0)  # decode_e4m3 returns the value times 2^-8


@triton.jit
def decode_e4m3(x):
    """uint8 bits of float8_e4m3fn -> the same values times 2^-8, as fp16, exactly
    (sign-extend, shift left by 7, keep bit 15 and bits 13..7: the fp16 bits of
    ``x * 2^-8``, subnormals included). For GPUs without FP8 conversions."""
    bits = x.to(tl.int8, bitcast=True).to(tl.int16)
    bits = ((bits << 7) & -16512).to(tl.int16)  # 0xbf80: bit 15 (sign) and bits 13..7 (eeee mmm)
    return bits.to(tl.float16, bitcast=True)


@dataclasses.dataclass(frozen=True)
class Target:
    """A GPU kernels are launched on, with what their launch configurations depend on."""

    name: str  # "sm90", "gfx942", ...
    backend: str  # "cuda" or "hip"
    arch: int | str  # compute capability as 90, or the gfx name
    warp_size: int
    num_sms: int  # streaming multiprocessors (compute units on AMD)
    shared_bytes: int  # shared memory (LDS) one program may use

    @property
    def fp8_dot(self) -> str:
        """How ``tl.dot`` takes float8_e4m3fn data here: ``"e4m3fn"`` as it is (sm_89
        and newer), ``"fnuz"`` with its bits read as float8_e4m3fnuz (gfx942's FP8
        MFMA: the value halves, and -0 must become +0), ``"fp16"`` decoded from
        bytes to fp16 in the kernel (older GPUs)."""
        if self.backend == "cuda":
            return "e4m3fn" if int(self.arch) >= 89 else "fp16"
        return "fnuz" if self.arch in ("gfx940", "gfx941", "gfx942") else "fp16"

    @property
    def wgmma(self) -> bool:
        """Whether dots of 64 or more rows run on Hopper's warpgroup MMA."""
        return self.backend == "cuda" and self.arch == 90

    def gpu_target(self):
        """Triton's ``GPUTarget`` for this target."""
        from triton.backends.compiler import GPUTarget

        return GPUTarget(self.backend, self.arch, self.warp_size)


# The four targets the `kernels` report compiles for, with the shared memory one
# program may use (the opt-in per-block limits) and a typical part's SM count.
TARGETS = {
    target.name: target
    for target in (
        Target("sm80", "cuda", 80, 32, num_sms=108, shared_bytes=163 * 1024),  # A100
        Target("sm89", "cuda", 89, 32, num_sms=142, shared_bytes=99 * 1024),  # L40S (RTX 4090: 128)
        Target("sm90", "cuda", 90, 32, num_sms=132, shared_bytes=227 * 1024),  # H100 / H200 SXM
        Target("gfx942", "hip", "gfx942", 64, num_sms=304, shared_bytes=64 * 1024),  # MI300X
    )
}

_targeted: contextvars.ContextVar[Target | None] = contextvars.ContextVar("dsinfra_triton_target", default=None)
_captured: contextvars.ContextVar[list | None] = contextvars.ContextVar("dsinfra_triton_launches", default=None)


def target_for(device: torch.device | str) -> Target:
    """The target whose launch configuration a launch on ``device`` uses: the one
    set by :func:`targeting`, else the GPU itself, else (the interpreter, on CPU
    tensors) sm_90's configuration with the CPU's thread count."""
    chosen = _targeted.get()
    if chosen is not None:
        return chosen
    device = torch.device(device)
    if device.type != "cuda":
        return dataclasses.replace(TARGETS["sm90"], name="interpreter", num_sms=backend.num_parallel_units(device))
    props = torch.cuda.get_device_properties(device)
    shared = getattr(props, "shared_memory_per_block_optin", 0) or 48 * 1024
    if torch.version.hip is not None:
        arch = re.match(r"gfx\w+?(?=:|$)", props.gcnArchName).group(0)
        return Target(arch, "hip", arch, 64, props.multi_processor_count, shared)
    arch = props.major * 10 + props.minor
    return Target(f"sm{arch}", "cuda", arch, 32, props.multi_processor_count, shared)


def autotuning() -> bool:
    """Whether wrappers may time candidate launch configurations: on a GPU, outside
    :func:`targeting` and :func:`capturing`, unless ``DSINFRA_AUTOTUNE=0``."""
    return (not backend.interpreting() and _targeted.get() is None and _captured.get() is None
            and os.environ.get("DSINFRA_AUTOTUNE", "1") != "0")


@contextlib.contextmanager
def targeting(target: Target) -> Iterator[Target]:
    """Within the block, wrappers choose their launch configurations for ``target``."""
    token = _targeted.set(target)
    try:
        yield target
    finally:
        _targeted.reset(token)


@dataclasses.dataclass
class Launch:
    """One kernel launch as a wrapper makes it: ``kernel[grid](*args, **kwargs)``."""

    kernel: Any  # triton.JITFunction
    grid: tuple
    args: tuple
    kwargs: dict[str, Any]


def launch(kernel, grid: tuple, *args, **kwargs) -> None:
    """``kernel[grid](*args, **kwargs)``, or recorded while :func:`capturing`."""
    launches = _captured.get()
    if launches is None:
        kernel[grid](*args, **kwargs)
    else:
        launches.append(Launch(kernel, grid, args, kwargs))


@contextlib.contextmanager
def capturing(target: Target) -> Iterator[list[Launch]]:
    """Within the block, :func:`launch` records launches instead of running them,
    and wrappers choose their configurations for ``target``. Call the wrappers
    with tensors on the ``meta`` device: the launches carry their shapes,
    strides and alignments, as the JIT would see them, and nothing runs."""
    launches: list[Launch] = []
    token = _captured.set(launches)
    try:
        with targeting(target):
            yield launches
    finally:
        _captured.reset(token)


@dataclasses.dataclass
class CompileCase:
    """One launch for the `kernels` report to compile, with the shape it serves
    (``config``, e.g. ``{"heads": 128, "s_q": 1, "cache": "fp8"}``) and what the
    compiled kernel must show besides compiling, without spills and within the
    target's shared memory: ``async_copy``, loads through cp.async or TMA on NVIDIA
    targets; ``wgmma``, warpgroup MMA on sm_90. ``representative`` cases are the
    ones a quick run (``--representative``) compiles."""

    config: dict[str, Any]
    launch: Launch
    async_copy: bool = False
    wgmma: bool = False
    representative: bool = False


def meta_tensor(*shape: int, dtype: torch.dtype) -> torch.Tensor:
    """A tensor with a shape, a dtype and strides but no memory, for :func:`capturing`."""
    return torch.empty(*shape, dtype=dtype, device="meta")
