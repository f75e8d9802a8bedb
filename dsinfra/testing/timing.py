"""What the wall-clock stand-ins for DeepSeek's timers share: synchronising a
GPU around a timed call, and shaping one call's time as their per-kernel timers
return kernel times."""

from __future__ import annotations

import torch


def synchronize() -> None:
    """Wait for the current GPU, if there is one."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def kernel_times(seconds: float, kernel_names: str | tuple[str, ...], num_kernels_per_period: int = 1):
    """A whole call's ``seconds`` shaped as DeepEP's ``bench_kineto`` (and DeepGEMM's)
    returns kernel times: one value per name (a tuple for a tuple of names, else the
    value); with ``num_kernels_per_period`` above 1 (a call that launches each kernel
    that many times, as a send and a receive half), each value is a list of that many
    equal parts, since the wall clock cannot tell the launches apart."""
    each = seconds if num_kernels_per_period <= 1 else [seconds / num_kernels_per_period] * num_kernels_per_period
    return tuple(each for _ in kernel_names) if isinstance(kernel_names, tuple) else each
