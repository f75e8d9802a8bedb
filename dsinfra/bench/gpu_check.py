"""The GPU check: correctness and speed of the Triton kernels at DeepSeek-V3's
shapes on one GPU, each against the GPU's own ceilings measured in the same run.

    python -m dsinfra.bench.gpu_check --out DIR [--seconds 300] [--quick] [--device cuda]

``scripts/gpu-check.sh`` runs it (see docs/performance.md). In order, while
time is left before the deadline (``--seconds`` from the start):

1. ceilings: copy and read bandwidth, bf16 matmul and FP8 matmul
   (``torch._scaled_mm``, tensor-wise scales) rates;
2. FlashMLA decoding at batch 128, 64, 8 and 1 with 128 and 16 heads, bf16 and
   FP8 cache (s_q 1, 4096 tokens on average, 64-token pages);
3. every GEMM shape of DeepGEMM's tables for DeepSeek-V3: dense (m 64, 128,
   4096), contiguous and masked grouped, K-grouped.

GEMMs run with the table's tile sizes (``DSINFRA_AUTOTUNE=0``: tuning every
shape would not fit the time); a last case times one shape after autotuning.
Every case is first checked against its reference (``calc_diff``, the bound
FlashMLA's or DeepGEMM's tests use) and then timed; a GEMM is also timed
against ``torch._scaled_mm`` with DeepGEMM's block scales (1x128 LHS, 128x128
RHS), or a bf16 matmul where this PyTorch lacks those. Each result goes to
``DIR/check.jsonl`` as one JSON line the moment it is known, and
``DIR/summary.md`` is rewritten after each, so a run cut short keeps every
finished case. Fractions: of the bf16 (MLA) or FP8 (GEMM) matmul rate, and of
the read bandwidth.

``--quick`` runs a few small cases instead (a smoke run, on a CPU too).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from dsinfra import environment
from dsinfra.bench import harness

MLA_BOUND, GEMM_BOUND = 1e-5, 1e-4  # calc_diff against the reference, as the tests bound it
MLA_CASES = [(batch, heads, fp8) for batch in (128, 64, 8, 1) for heads in (128, 16) for fp8 in (False, True)]
GEMM_NK = [(2112, 7168), (576, 7168), (24576, 1536), (32768, 512), (7168, 16384), (4096, 7168), (7168, 2048)]
GEMM_CASES = (
    [("dense", 1, m, n, k) for m in (4096, 128, 64) for n, k in GEMM_NK]
    + [("contiguous", groups, m, n, k) for groups, m in ((4, 8192), (8, 4096)) for n, k in ((4096, 7168), (7168, 2048))]
    + [("masked", groups, m, n, k) for groups, m in ((32, 192), (6, 1024)) for n, k in ((4096, 7168), (7168, 2048))]
    + [("k-grouped", groups, m, n, k) for groups, m, n, k in ((4, 4096, 7168, 8192), (8, 7168, 2048, 4096))]
)


QUICK_MLA_CASES = [(2, 16, False), (2, 16, True)]
QUICK_GEMM_CASES = [("dense", 1, 64, 256, 256), ("contiguous", 2, 128, 128, 256), ("masked", 2, 32, 128, 256),
                    ("k-grouped", 2, 64, 64, 256)]


class Check:
    """Runs cases until the deadline, writing each result as it comes."""

    def __init__(self, out: Path, device: torch.device, seconds: float, quick: bool, log: Callable[[str], None] = print):
        self.out, self.device, self.quick, self.log = out, device, quick, log
        self.deadline = time.monotonic() + seconds
        self.results: list[dict[str, Any]] = []
        self.ceilings: harness.Ceilings | None = None
        out.mkdir(parents=True, exist_ok=True)
        (out / "check.jsonl").write_text("")

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def record(self, result: dict[str, Any]) -> None:
        self.results.append(result)
        with open(self.out / "check.jsonl", "a") as out:
            out.write(json.dumps(result, default=str) + "\n")
        (self.out / "summary.md").write_text(summary(self.results))
        figures = ", ".join(f"{key} {value:.3g}" if isinstance(value, float) else f"{key} {value}"
                            for key, value in result.items() if key not in ("kind", "case") and value is not None)
        self.log(f"{result['kind']} {result['case']}: {figures}")

    def run(self, kind: str, case: str, work: Callable[[], dict[str, Any]], reserve: float = 5.0) -> None:
        """Record ``work()``'s figures for a case, its error, or that time ran out."""
        if self.left() < reserve:
            self.record({"kind": kind, "case": case, "ok": None, "error": "skipped: the deadline was near"})
            return
        try:
            result = {"kind": kind, "case": case, **work()}
        except Exception as error:  # a failing case is a finding; the others still run
            self.log(traceback.format_exc())
            result = {"kind": kind, "case": case, "ok": False, "error": f"{type(error).__name__}: {error}"}
        self.record(result)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def time(self, fn: Callable[[], Any]) -> float:
        """Median seconds of ``fn`` (cold L2 on a GPU)."""
        repeats = 1 if self.quick else 10
        flush = 0 if self.device.type != "cuda" else 256 * 2**20
        return harness.time_callable(fn, self.device, warmup=1, repeats=repeats, flush_bytes=flush).median


def fractions(flops: float, moved: float, seconds: float, matmul_rate: float | None, read_rate: float | None) -> dict:
    """Rates of a case and their fractions of the matching ceilings."""
    return {
        "ms": seconds * 1e3,
        "tflops": flops / seconds / 1e12,
        "gbps": moved / seconds / 1e9,
        "of_matmul": flops / seconds / matmul_rate if matmul_rate else None,
        "of_read": moved / seconds / read_rate if read_rate else None,
    }


def measure_ceilings(check: Check) -> None:
    def work():
        check.ceilings = harness.measure_ceilings(check.device, quick=check.quick)
        return {"ok": True, **check.ceilings.as_dict()}

    check.run("ceiling", str(check.device), work, reserve=float("-inf"))  # every fraction needs them


def mla_case(check: Check, batch: int, heads: int, fp8: bool) -> dict[str, Any]:
    """One FlashMLA decoding step (s_q 1, 576/512 heads) checked and timed."""
    from dsinfra import flash_mla
    from dsinfra.bench.flash_mla import HEAD_DIM, HEAD_DIM_V, decoding_inputs
    from dsinfra.flash_mla import reference
    from dsinfra.testing import calc_diff

    mean = 128 if check.quick else 4096
    q, k_cache, block_table, lengths, _ = decoding_inputs(batch, mean, heads, 1, True, None, check.device)
    if fp8:
        k_cache = flash_mla.quantize_k_cache(k_cache, HEAD_DIM_V)
    plan = flash_mla.get_mla_metadata(lengths, heads, 1)
    args = (q, k_cache, block_table, lengths, HEAD_DIM_V, *plan)
    out, lse = flash_mla.flash_mla_with_kvcache(*args, is_fp8_kvcache=fp8)
    expected_out, expected_lse = reference.flash_mla_with_kvcache(*args, HEAD_DIM**-0.5, False, fp8)
    diff = max(calc_diff(out.float(), expected_out.float()), calc_diff(lse, expected_lse))
    seconds = check.time(lambda: flash_mla.flash_mla_with_kvcache(*args, is_fp8_kvcache=fp8))
    tokens = float(lengths.float().sum())
    flops = heads * tokens * 2 * (HEAD_DIM + HEAD_DIM_V)
    moved = batch * heads * 2 * (HEAD_DIM + HEAD_DIM_V) + tokens * (656 if fp8 else 2 * HEAD_DIM)
    ceilings = check.ceilings
    return {"ok": diff < MLA_BOUND, "calc_diff": diff, **fractions(flops, moved, seconds, ceilings and ceilings.matmul_flops_per_s,
                                                                   ceilings and ceilings.read_bytes_per_s)}


def _scaled_mm_time(check: Check, x: torch.Tensor, y: torch.Tensor, lhs, rhs) -> dict[str, Any]:
    """The same product through torch._scaled_mm with block scales, or else a bf16 matmul."""
    from dsinfra.bench.deep_gemm import _scaled_mm

    scaled_mm = _scaled_mm(lhs, rhs) if check.device.type == "cuda" else None
    if scaled_mm is not None:
        return {"versus": "torch._scaled_mm block scales", "versus_ms": check.time(scaled_mm) * 1e3}
    return {"versus": "bf16 matmul", "versus_ms": check.time(lambda: x @ y.T) * 1e3}


def gemm_case(check: Check, kind: str, groups: int, m: int, n: int, k: int) -> dict[str, Any]:
    """One DeepGEMM-shaped FP8 GEMM checked against the reference and timed."""
    from dsinfra import deep_gemm
    from dsinfra.deep_gemm import reference
    from dsinfra.testing import calc_diff

    device, cast_rows, cast_blocks = check.device, deep_gemm.per_token_cast_to_fp8, deep_gemm.per_block_cast_to_fp8
    x = torch.randn(groups * m if kind != "k-grouped" else groups * k, k if kind != "k-grouped" else m, device=device).to(torch.bfloat16)
    w = torch.randn(groups, n, k, device=device).to(torch.bfloat16) if kind != "k-grouped" else None
    versus: dict[str, Any] = {}
    if kind == "k-grouped":
        y = torch.randn(groups * k, n, device=device).to(torch.bfloat16)
        a, b = _column_cast(x, [k] * groups), _column_cast(y, [k] * groups)
        d = torch.empty(groups, m, n, dtype=torch.float32, device=device)
        run = lambda: deep_gemm.k_grouped_fp8_gemm_tn_contiguous(a, b, d, [k] * groups)  # noqa: E731
        expected = torch.empty_like(d)
        reference.k_grouped_fp8_gemm_tn_contiguous(*a, *b, expected, [k] * groups, None)
    else:
        lhs = cast_rows(x)
        casts = [cast_blocks(w[g]) for g in range(groups)]
        rhs = torch.stack([c[0] for c in casts]), torch.stack([c[1] for c in casts])
        if kind == "dense":
            d = torch.empty(m, n, dtype=torch.bfloat16, device=device)
            rhs = rhs[0][0], rhs[1][0]
            run = lambda: deep_gemm.fp8_gemm_nt(lhs, rhs, d)  # noqa: E731
            expected = torch.empty_like(d)
            reference.fp8_gemm_nt(*lhs, *rhs, expected, None)
            versus = _scaled_mm_time(check, x, w[0], lhs, rhs)
        elif kind == "contiguous":
            m_indices = torch.arange(groups, device=device, dtype=torch.int32).repeat_interleave(m)
            d = torch.empty(groups * m, n, dtype=torch.bfloat16, device=device)
            run = lambda: deep_gemm.m_grouped_fp8_gemm_nt_contiguous(lhs, rhs, d, m_indices)  # noqa: E731
            expected = torch.empty_like(d)
            reference.m_grouped_fp8_gemm_nt_contiguous(*lhs, *rhs, expected, m_indices)
        else:
            lhs = lhs[0].view(groups, m, k), lhs[1].view(groups, m, -1)
            masked_m = torch.full((groups,), m, device=device, dtype=torch.int32)
            d = torch.empty(groups, m, n, dtype=torch.bfloat16, device=device)
            run = lambda: deep_gemm.m_grouped_fp8_gemm_nt_masked(lhs, rhs, d, masked_m, m)  # noqa: E731
            expected = torch.empty_like(d)
            reference.m_grouped_fp8_gemm_nt_masked(*lhs, *rhs, expected, masked_m, m)
    run()
    diff = calc_diff(d.float(), expected.float())
    seconds = check.time(run)
    flops, moved = 2 * groups * m * n * k, groups * (m * k + n * k) + d.numel() * d.element_size()
    ceilings = check.ceilings
    rates = fractions(flops, moved, seconds, ceilings and ceilings.fp8_matmul_flops_per_s, ceilings and ceilings.read_bytes_per_s)
    if versus:
        versus["speedup"] = versus["versus_ms"] / rates["ms"]
    return {"ok": diff < GEMM_BOUND, "calc_diff": diff, **rates, **versus}


def autotune_case(check: Check, m: int, n: int, k: int) -> dict[str, Any]:
    """One dense GEMM with the table's tiles, then autotuned (first call tunes)."""
    from dsinfra import deep_gemm

    x, w = torch.randn(m, k, device=check.device), torch.randn(n, k, device=check.device)
    lhs, rhs = deep_gemm.per_token_cast_to_fp8(x), deep_gemm.per_block_cast_to_fp8(w)
    d = torch.empty(m, n, dtype=torch.bfloat16, device=check.device)
    table = check.time(lambda: deep_gemm.fp8_gemm_nt(lhs, rhs, d))
    os.environ["DSINFRA_AUTOTUNE"] = "1"
    try:
        deep_gemm.fp8_gemm_nt(lhs, rhs, d)
        tuned = check.time(lambda: deep_gemm.fp8_gemm_nt(lhs, rhs, d))
    finally:
        os.environ["DSINFRA_AUTOTUNE"] = "0"
    return {"ok": True, "ms": tuned * 1e3, "versus": "the table's tiles", "versus_ms": table * 1e3, "speedup": table / tuned}


def _column_cast(t: torch.Tensor, ks: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """The K-grouped operand layout: each run of ks[g] rows cast per column over 128 rows."""
    from dsinfra.fp8 import per_token_cast_to_fp8

    runs = [per_token_cast_to_fp8(run.T) for run in t.split(ks)]
    return torch.cat([r[0].T for r in runs]).contiguous(), torch.cat([r[1].T for r in runs]).contiguous()


def summary(results: list[dict[str, Any]]) -> str:
    """A Markdown table of the results so far."""
    columns = ["kind", "case", "ok", "calc_diff", "ms", "tflops", "gbps", "of_matmul", "of_read", "versus", "speedup", "error"]
    ceilings = [r for r in results if r["kind"] == "ceiling"]
    lines = []
    for ceiling in ceilings:
        lines.append(", ".join(f"{key} {value:.4g}" for key, value in ceiling.items() if isinstance(value, float)))
    rows = [r for r in results if r["kind"] != "ceiling"]
    lines += ["", "| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
    for row in rows:
        cells = []
        for column in columns:
            value = row.get(column)
            if column.startswith("of_") and value is not None:
                cells.append(f"{100 * value:.1f}%")
            elif isinstance(value, float):
                cells.append(f"{value:.3g}")
            else:
                cells.append("-" if value is None else str(value).replace("|", "/"))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def run_cases(check: Check, args: argparse.Namespace) -> None:
    """Ceilings, then every case, in order, while time is left."""
    check.log(f"{datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}: "
              f"{json.dumps(environment.versions())}, {args.device}")
    measure_ceilings(check)
    for batch, heads, fp8 in QUICK_MLA_CASES if args.quick else MLA_CASES:
        check.run("mla", f"b={batch} h={heads} {'fp8' if fp8 else 'bf16'}", lambda: mla_case(check, batch, heads, fp8))
    for kind, groups, m, n, k in QUICK_GEMM_CASES if args.quick else GEMM_CASES:
        name = f"{kind} {groups}x" if groups > 1 else kind
        check.run("gemm", f"{name} m={m} n={n} k={k}", lambda: gemm_case(check, kind, groups, m, n, k))
    if check.device.type == "cuda":
        check.run("gemm", "autotuned dense m=4096 n=7168 k=2048", lambda: autotune_case(check, 4096, 7168, 2048), reserve=30)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dsinfra.bench.gpu_check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="directory for check.jsonl and summary.md")
    parser.add_argument("--seconds", type=float, default=300.0, help="stop starting cases after this long (default 300)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="small shapes: a smoke run")
    args = parser.parse_args(argv)
    check = Check(Path(args.out), torch.device(args.device), args.seconds, args.quick)
    previous = os.environ.get("DSINFRA_AUTOTUNE")
    os.environ["DSINFRA_AUTOTUNE"] = "0"
    try:
        run_cases(check, args)
    finally:
        if previous is None:
            del os.environ["DSINFRA_AUTOTUNE"]
        else:
            os.environ["DSINFRA_AUTOTUNE"] = previous
    failed = [r for r in check.results if r.get("ok") is False]
    check.log(f"{len(check.results)} results, {len(failed)} failed, {max(0.0, check.left()):.0f} s to spare")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
