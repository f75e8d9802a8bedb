"""The benchmark harness every component benchmark uses.

A component benchmark is a module ``dsinfra/bench/<component>.py`` with a
docstring (its first line is the description) and a function ``benchmark(ctx)``
that reports cases through the :class:`BenchContext` it is given::

    def benchmark(ctx):
        for m, n, k in SHAPES if not ctx.quick else SHAPES[:1]:
            a, b = ...
            ctx.measure(f"{m}x{n}x{k}", lambda: fast(a, b), baseline=lambda: naive(a, b),
                        flops=2 * m * n * k, bytes=a.nbytes + b.nbytes, params={"m": m})

Every figure is measured in the same run: the machine's ceilings (copy
bandwidth, matmul rate: bf16, or float32 on a CPU without native bf16) on the
chosen device first, then each case and its naive baseline, so the ratios
compare like with like.

Importing a benchmark module must stay cheap (the runner imports them all to
list them): import the component inside ``benchmark``.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch


@dataclasses.dataclass
class Timing:
    """Seconds per call over ``len(samples)`` repeats after warm-up."""

    samples: list[float]

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    @property
    def min(self) -> float:
        return min(self.samples)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_callable(
    fn: Callable[[], Any], device: torch.device | str, *, warmup: int = 2, repeats: int = 10, flush_bytes: int = 0
) -> Timing:
    """Time ``fn()``: ``warmup`` untimed calls, then ``repeats`` timed ones.

    On a GPU each call is timed with CUDA events and, with ``flush_bytes``, is
    preceded by a write of that many bytes so it starts with a cold L2 cache.
    """
    device = torch.device(device)
    for _ in range(warmup):
        fn()
    synchronize(device)
    if device.type != "cuda":
        samples = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - start)
        return Timing(samples)
    flush = torch.empty(flush_bytes, dtype=torch.uint8, device=device) if flush_bytes else None
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(repeats)]
    for start, end in events:
        if flush is not None:
            flush.zero_()
        start.record()
        fn()
        end.record()
    synchronize(device)
    return Timing([start.elapsed_time(end) / 1e3 for start, end in events])


@dataclasses.dataclass
class Ceilings:
    """What the device can do, measured in this run."""

    copy_bytes_per_s: float  # device memory -> device memory, bytes read + written
    matmul_flops_per_s: float  # square torch.matmul in matmul_dtype
    copy_bytes: int  # size of the copied tensor
    matmul_size: int  # n of the n x n x n matmul
    matmul_dtype: str = "bfloat16"  # float32 on a CPU without native bf16 matmuls (what dsinfra multiplies in there)
    read_bytes_per_s: float | None = None  # device memory read once (a sum over it)
    fp8_matmul_flops_per_s: float | None = None  # square float8_e4m3fn torch._scaled_mm, tensor-wise scales (GPUs)

    def as_dict(self) -> dict[str, float]:
        return dataclasses.asdict(self)


def measure_ceilings(device: torch.device | str, *, quick: bool = False) -> Ceilings:
    """Copy bandwidth and matmul rate of ``device``, best of several repeats.

    The matmul is bf16, except on a CPU that has no native bf16 matmul: there a
    bf16 matmul is a scalar loop (minutes at this size) and dsinfra's CPU paths
    multiply in float32, so float32 is the rate they can reach."""
    from dsinfra.backend import native_cpu_matmul

    device = torch.device(device)
    gpu = device.type == "cuda"
    dtype = torch.bfloat16 if device.type != "cpu" or native_cpu_matmul(torch.bfloat16) else torch.float32
    copy_bytes = (32 if quick else 1024 if gpu else 256) * 2**20
    src = torch.ones(copy_bytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    copy = time_callable(lambda: dst.copy_(src), device, repeats=5 if quick else 20)
    n = (1024 if quick else 8192) if gpu else (512 if quick else 2048)
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    matmul = time_callable(lambda: torch.matmul(a, b), device, repeats=5 if quick else 20)
    read = time_callable(lambda: src.sum(), device, repeats=5 if quick else 20)
    return Ceilings(
        copy_bytes_per_s=2 * copy_bytes / copy.min,
        matmul_flops_per_s=2 * n**3 / matmul.min,
        copy_bytes=copy_bytes,
        matmul_size=n,
        matmul_dtype=str(dtype).removeprefix("torch."),
        read_bytes_per_s=copy_bytes / read.min,
        fp8_matmul_flops_per_s=fp8_matmul_rate(a, b, repeats=5 if quick else 20) if gpu else None,
    )


def fp8_matmul_rate(a: torch.Tensor, b: torch.Tensor, repeats: int) -> float | None:
    """FLOP/s of ``torch._scaled_mm`` on a and b cast to float8_e4m3fn with tensor-wise
    scales (the fastest FP8 matmul PyTorch offers), or None where it is unavailable."""
    x = a.to(torch.float8_e4m3fn)
    y = b.to(torch.float8_e4m3fn).t().contiguous().t()  # column-major, as _scaled_mm wants its second operand
    one = torch.ones((), dtype=torch.float32, device=a.device)
    try:
        timing = time_callable(lambda: torch._scaled_mm(x, y, scale_a=one, scale_b=one, out_dtype=torch.bfloat16),
                               a.device, repeats=repeats)
    except (RuntimeError, NotImplementedError, TypeError, ValueError):
        return None
    return 2 * a.shape[0] * a.shape[1] * b.shape[1] / timing.min


@dataclasses.dataclass
class Result:
    """One benchmark case: its timing, its work, and the ratios derived from them."""

    component: str
    case: str
    time_s: float  # median seconds per call
    min_time_s: float
    flops: float = 0.0  # floating-point operations per call (0: not a FLOP-bound case)
    bytes: float = 0.0  # bytes that must move per call (0: not reported)
    baseline: str | None = None  # name of the naive baseline
    baseline_time_s: float | None = None
    params: dict[str, Any] = dataclasses.field(default_factory=dict)
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)  # component-specific figures
    flops_per_s: float | None = None
    bytes_per_s: float | None = None
    matmul_fraction: float | None = None  # flops_per_s / measured matmul rate (Ceilings.matmul_dtype)
    copy_fraction: float | None = None  # bytes_per_s / measured copy bandwidth
    speedup: float | None = None  # baseline_time_s / time_s

    def derive(self, ceilings: Ceilings | None) -> Result:
        """Fill in the rates and ratios from the raw figures."""
        if self.flops and self.time_s > 0:
            self.flops_per_s = self.flops / self.time_s
            if ceilings is not None:
                self.matmul_fraction = self.flops_per_s / ceilings.matmul_flops_per_s
        if self.bytes and self.time_s > 0:
            self.bytes_per_s = self.bytes / self.time_s
            if ceilings is not None:
                self.copy_fraction = self.bytes_per_s / ceilings.copy_bytes_per_s
        if self.baseline_time_s is not None and self.time_s > 0:
            self.speedup = self.baseline_time_s / self.time_s
        return self


class BenchContext:
    """What a component's ``benchmark(ctx)`` gets: the device, the run's settings and
    ceilings, and the methods that time and record cases."""

    def __init__(
        self,
        component: str,
        device: torch.device | str,
        *,
        ceilings: Ceilings | None,
        quick: bool = False,
        warmup: int = 2,
        repeats: int = 10,
        log: Callable[[str], None] = print,
    ):
        self.component = component
        self.device = torch.device(device)
        self.ceilings = ceilings
        self.quick = quick
        self.warmup = warmup
        self.repeats = repeats
        self.results: list[Result] = []
        self.log = log

    def time(self, fn: Callable[[], Any], *, repeats: int | None = None, warmup: int | None = None) -> Timing:
        """Time ``fn()`` on this run's device with this run's settings (cold L2 on a GPU)."""
        return time_callable(
            fn,
            self.device,
            warmup=self.warmup if warmup is None else warmup,
            repeats=self.repeats if repeats is None else repeats,
            flush_bytes=256 * 2**20 if self.device.type == "cuda" else 0,
        )

    def measure(
        self,
        case: str,
        fn: Callable[[], Any],
        *,
        baseline: Callable[[], Any] | None = None,
        baseline_name: str = "reference",
        baseline_repeats: int | None = None,
        flops: float = 0.0,
        bytes: float = 0.0,
        params: dict[str, Any] | None = None,
        extra: dict[str, Any] | None = None,
    ) -> Result:
        """Time ``fn`` and, if given, its naive ``baseline`` (a slow baseline may
        take fewer ``baseline_repeats``), and record the case."""
        timing = self.time(fn)
        baseline_timing = None
        if baseline is not None:
            baseline_timing = self.time(baseline, repeats=baseline_repeats, warmup=1 if baseline_repeats else None)
        return self.record(
            case,
            time_s=timing.median,
            min_time_s=timing.min,
            baseline=baseline_name if baseline is not None else None,
            baseline_time_s=baseline_timing.median if baseline_timing else None,
            flops=flops,
            bytes=bytes,
            params=params,
            extra=extra,
        )

    def record(
        self,
        case: str,
        *,
        time_s: float,
        min_time_s: float | None = None,
        baseline: str | None = None,
        baseline_time_s: float | None = None,
        flops: float = 0.0,
        bytes: float = 0.0,
        params: dict[str, Any] | None = None,
        extra: dict[str, Any] | None = None,
    ) -> Result:
        """Record a case timed elsewhere (in spawned ranks, say)."""
        result = Result(
            component=self.component,
            case=case,
            time_s=time_s,
            min_time_s=time_s if min_time_s is None else min_time_s,
            flops=flops,
            bytes=bytes,
            baseline=baseline,
            baseline_time_s=baseline_time_s,
            params=dict(params or {}),
            extra=dict(extra or {}),
        ).derive(self.ceilings)
        self.results.append(result)
        return result
