"""``deep_ep.utils.testing``: DeepEP's timers, by the wall clock.

DeepEP times each call with CUDA events (:func:`bench`) or reads kernel times
from the profiler (:func:`bench_kineto`); here both time whole calls by the wall
clock, synchronising a GPU around each, and :func:`bench_kineto` gives that one
time for every kernel name asked for. Profiler options are accepted and ignored.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

L2_FLUSH_BYTES = 256 * 10**6


def flush_l2_cache(enabled: bool = True) -> None:
    """With a GPU, overwrite 256 MB so the next call starts with a cold L2 cache; nothing on a CPU."""
    if enabled and torch.cuda.is_available():
        torch.empty(L2_FLUSH_BYTES // 4, dtype=torch.int32, device="cuda").zero_()


def _synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def bench(fn: Callable[[], object], num_warmups: int = 50, num_tests: int = 50,
          post_fn: Callable[[], object] | None = None, flush_l2: bool = True) -> tuple[float, float, float]:
    """(mean, min, max) seconds per call of ``fn`` over ``num_tests`` calls after
    ``num_warmups``, the first timed call left out as DeepEP leaves it out;
    ``post_fn`` runs untimed after each."""
    for _ in range(num_warmups):
        fn()
    samples = []
    for _ in range(max(num_tests, 2)):
        flush_l2_cache(flush_l2)
        _synchronize()
        start = time.perf_counter()
        fn()
        _synchronize()
        samples.append(time.perf_counter() - start)
        if post_fn is not None:
            post_fn()
    samples = samples[1:]
    return statistics.fmean(samples), min(samples), max(samples)


def bench_kineto(
    fn: Callable[[], object], kernel_names: str | tuple[str, ...], num_tests: int = 30,
    *, num_kernels_per_period: int = 1, **_ignored,
) -> float | list | tuple:
    """Seconds per call of ``fn`` (the mean over ``num_tests`` after one warm-up
    call) for each name in ``kernel_names``, shaped as :func:`kernel_times` says."""
    seconds = bench(fn, num_warmups=1, num_tests=num_tests, flush_l2=False)[0]
    return kernel_times(seconds, kernel_names, num_kernels_per_period)


def kernel_times(seconds: float, kernel_names: str | tuple[str, ...], num_kernels_per_period: int = 1):
    """A whole call's ``seconds`` shaped as DeepEP's ``bench_kineto`` returns kernel
    times: one value per name (a tuple for a tuple of names, else the value); with
    ``num_kernels_per_period`` above 1 (a call that launches each kernel that many
    times, as a send and a receive half), each value is a list of that many equal
    parts, since the wall clock cannot tell the launches apart."""
    each = seconds if num_kernels_per_period <= 1 else [seconds / num_kernels_per_period] * num_kernels_per_period
    return tuple(each for _ in kernel_names) if isinstance(kernel_names, tuple) else each
