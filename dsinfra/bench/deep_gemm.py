"""DeepGEMM: FP8 GEMMs (dense, contiguous, masked) and FP8Linear against bf16 torch.matmul and the reference.

DeepGEMM's own shape tables (tests/test_core.py), scaled to the device: on the
CPU m is capped at 4096 rows per group and n and k are divided by 4 (see
``_scale``); on a GPU they are as upstream (``--quick`` shrinks both).
Each case reports the FP8 GEMM's FLOP/s and GB/s (FP8 operands and a bf16 output,
counted as DeepGEMM counts them), the dequantising reference as the baseline,
and in ``extra`` the same-shape bf16 ``torch.matmul`` time (into the same preallocated output) and its ratio
``vs_bf16_matmul`` (bf16 time / FP8 time: above 1 means faster), plus on CUDA
``vs_scaled_mm`` against ``torch._scaled_mm`` with blockwise (1x128, 128x128)
scales where the installed torch has it.
"""

from __future__ import annotations

import torch

# DeepGEMM's tables: dense (m, n, k); contiguous (groups, m per group, n, k); masked (groups, m per group, n, k)
DENSE_NK = [(2112, 7168), (24576, 1536), (32768, 512), (7168, 16384), (4096, 7168), (7168, 2048)]
DENSE = [(m, n, k) for m in (64, 128, 4096) for n, k in DENSE_NK]
CONTIGUOUS = [(4, 8192, 4096, 7168), (4, 8192, 7168, 2048), (8, 4096, 4096, 7168), (8, 4096, 7168, 2048)]
MASKED = [(g, m, n, k) for g, m in ((1, 1024), (2, 512), (4, 256)) for n, k in ((4096, 7168), (7168, 2048))]
# FP8Linear forward + backward (tokens, in_features, out_features): the demo's expert FFN sizes and a larger one
LINEAR = [(256, 256, 128), (1024, 256, 512), (4096, 1024, 2048)]


def _scale(device: torch.device, quick: bool) -> tuple[int, int]:
    """(largest m per group, n and k divisor) that fit the device in a benchmark's time."""
    if device.type == "cuda":
        return (1024, 4) if quick else (8192, 1)
    return (256, 8) if quick else (4096, 4)


def _fp8_operands(m: int, n: int, k: int, groups: int, device: torch.device):
    """Per-token LHS [groups*m, k] and per-block RHS [groups, n, k] with their bf16 originals."""
    from dsinfra import deep_gemm

    x = torch.randn(groups * m, k, device=device, dtype=torch.bfloat16)
    w = torch.randn(groups, n, k, device=device, dtype=torch.bfloat16)
    casts = [deep_gemm.per_block_cast_to_fp8(w[g]) for g in range(groups)]
    rhs = torch.stack([c[0] for c in casts]), torch.stack([c[1] for c in casts])
    return x, w, deep_gemm.per_token_cast_to_fp8(x), rhs


def _figures(groups: int, m: int, n: int, k: int) -> dict[str, float]:
    return {"flops": 2 * groups * m * n * k, "bytes": groups * (m * k + n * k + 2 * m * n)}


def _add_bf16_ratio(ctx, result, bf16_matmul) -> None:
    bf16 = ctx.time(bf16_matmul).median
    result.extra.update(bf16_ms=bf16 * 1e3, vs_bf16_matmul=bf16 / result.time_s)


def _scaled_mm(lhs, rhs):
    """torch._scaled_mm with DeepGEMM's scales (1x128 LHS column-major, 128x128 RHS), or None."""
    (x, sa), (y, sb) = lhs, rhs
    try:
        scale_a = sa.t().contiguous().t()
        torch._scaled_mm(x, y.t(), scale_a=scale_a, scale_b=sb.t(), out_dtype=torch.bfloat16)
    except (RuntimeError, NotImplementedError, ValueError, TypeError):
        return None
    return lambda: torch._scaled_mm(x, y.t(), scale_a=scale_a, scale_b=sb.t(), out_dtype=torch.bfloat16)


def _dense(ctx, deep_gemm, reference, m_cap, nk_div) -> None:
    shapes = DENSE[:: len(DENSE) // 3] if ctx.quick else DENSE
    for m, n, k in shapes:
        m, n, k = min(m, m_cap), n // nk_div, k // nk_div
        x, w, lhs, rhs = _fp8_operands(m, n, k, 1, ctx.device)
        rhs = rhs[0][0], rhs[1][0]
        out = torch.empty(m, n, device=ctx.device, dtype=torch.bfloat16)
        result = ctx.measure(
            f"dense m={m} n={n} k={k}",
            lambda: deep_gemm.gemm_fp8_fp8_bf16_nt(lhs, rhs, out),
            baseline=lambda: reference.fp8_gemm_nt(*lhs, *rhs, out, None),
            baseline_repeats=3,
            params={"m": m, "n": n, "k": k},
            **_figures(1, m, n, k),
        )
        _add_bf16_ratio(ctx, result, lambda: torch.matmul(x, w[0].T, out=out))
        if ctx.device.type == "cuda":
            scaled_mm = _scaled_mm(lhs, rhs)
            result.extra["vs_scaled_mm"] = ctx.time(scaled_mm).median / result.time_s if scaled_mm else None


def _contiguous(ctx, deep_gemm, reference, m_cap, nk_div) -> None:
    for groups, m, n, k in CONTIGUOUS[:1] if ctx.quick else CONTIGUOUS:
        m, n, k = min(m, m_cap), n // nk_div, k // nk_div
        x, w, lhs, rhs = _fp8_operands(m, n, k, groups, ctx.device)
        m_indices = torch.arange(groups, device=ctx.device, dtype=torch.int32).repeat_interleave(m)
        out = torch.empty(groups * m, n, device=ctx.device, dtype=torch.bfloat16)
        result = ctx.measure(
            f"contiguous groups={groups} m={m} n={n} k={k}",
            lambda: deep_gemm.m_grouped_gemm_fp8_fp8_bf16_nt_contiguous(lhs, rhs, out, m_indices),
            baseline=lambda: reference.m_grouped_fp8_gemm_nt_contiguous(*lhs, *rhs, out, m_indices),
            baseline_repeats=3,
            params={"groups": groups, "m_per_group": m, "n": n, "k": k},
            **_figures(groups, m, n, k),
        )
        _add_bf16_ratio(ctx, result, lambda: torch.bmm(x.view(groups, m, k), w.transpose(1, 2), out=out.view(groups, m, n)))


def _masked(ctx, deep_gemm, reference, m_cap, nk_div) -> None:
    for groups, m, n, k in MASKED[:1] if ctx.quick else MASKED:
        m, n, k = min(m, m_cap), n // nk_div, k // nk_div
        x, w, (x_fp8, sa), rhs = _fp8_operands(m, n, k, groups, ctx.device)
        lhs = x_fp8.view(groups, m, k), sa.view(groups, m, -1)
        masked_m = torch.full((groups,), m, device=ctx.device, dtype=torch.int32)
        out = torch.empty(groups, m, n, device=ctx.device, dtype=torch.bfloat16)
        result = ctx.measure(
            f"masked groups={groups} m={m} n={n} k={k}",
            lambda: deep_gemm.m_grouped_gemm_fp8_fp8_bf16_nt_masked(lhs, rhs, out, masked_m, m),
            baseline=lambda: reference.m_grouped_fp8_gemm_nt_masked(*lhs, *rhs, out, masked_m, m),
            baseline_repeats=3,
            params={"groups": groups, "m_per_group": m, "n": n, "k": k},
            **_figures(groups, m, n, k),
        )
        _add_bf16_ratio(ctx, result, lambda: torch.bmm(x.view(groups, m, k), w.transpose(1, 2), out=out.view(groups, m, n)))


def _linear(ctx, deep_gemm) -> None:
    """FP8Linear forward and backward (3 GEMMs and the casts) against bf16 nn.Linear's."""
    for tokens, in_features, out_features in LINEAR[:1] if ctx.quick else LINEAR:
        fp8_layer = deep_gemm.FP8Linear(in_features, out_features, device=ctx.device, dtype=torch.bfloat16)
        bf16_layer = torch.nn.Linear(in_features, out_features, device=ctx.device, dtype=torch.bfloat16)
        x = torch.randn(tokens, in_features, device=ctx.device, dtype=torch.bfloat16, requires_grad=True)
        grad = torch.randn(tokens, out_features, device=ctx.device, dtype=torch.bfloat16)
        result = ctx.measure(
            f"FP8Linear fwd+bwd tokens={tokens} in={in_features} out={out_features}",
            lambda: fp8_layer(x).backward(grad),
            params={"tokens": tokens, "in_features": in_features, "out_features": out_features},
            flops=3 * 2 * tokens * in_features * out_features,
        )
        _add_bf16_ratio(ctx, result, lambda: bf16_layer(x).backward(grad))


def benchmark(ctx) -> None:
    from dsinfra import backend, deep_gemm
    from dsinfra.deep_gemm import reference

    m_cap, nk_div = _scale(ctx.device, ctx.quick)
    implementation = backend.choose("fp8_gemm_nt", ctx.device)
    ctx.log(f"shapes: DeepGEMM's, m at most {m_cap} per group, n and k / {nk_div}; implementation: {implementation}")
    _dense(ctx, deep_gemm, reference, m_cap, nk_div)
    _contiguous(ctx, deep_gemm, reference, m_cap, nk_div)
    _masked(ctx, deep_gemm, reference, m_cap, nk_div)
    _linear(ctx, deep_gemm)
