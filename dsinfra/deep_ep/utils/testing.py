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

from dsinfra.testing.timing import kernel_times, synchronize

__all__ = ["bench", "bench_kineto", "flush_l2_cache", "kernel_times"]

L2_FLUSH_BYTES = 256 * 10**6


def flush_l2_cache(enabled: bool = True) -> None:
    """With a GPU, overwrite 256 MB so the next call starts with a cold L2 cache; nothing on a CPU."""
    if enabled and torch.cuda.is_available():
        torch.empty(L2_FLUSH_BYTES // 4, dtype=torch.int32, device="cuda").zero_()


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
        synchronize()
        start = time.perf_counter()
        fn()
        synchronize()
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

