"""FP8 casts of dsinfra.fp8 against their one-pass formulas: time and GB/s.

The baseline of each cast is its formula written as one pass over the whole
tensor (``x.float()``, the group maxima, a division, ``.to(float8)``; back:
``x_fp8.float() * scales``), which is what dsinfra's casts did before they
widened FP8 with integer ops and worked in row chunks on a CPU. Both give the
same bits (``tests/test_fp8.py``). Shapes: tokens of DeepSeek-V3's hidden size
7168 and an expert weight of 2048 x 7168, bf16; bytes count the input read and
the output written once.
"""

from __future__ import annotations

HIDDEN, WEIGHT_ROWS = 7168, 2048


def one_pass_per_token(x):
    """per_token_cast_to_fp8 as one pass (k a multiple of 128)."""
    import torch

    groups = x.float().unflatten(-1, (-1, 128))
    scales = groups.abs().amax(dim=-1).clamp(min=1e-4) / 448.0
    return (groups / scales[..., None]).flatten(-2).to(torch.float8_e4m3fn), scales


def one_pass_per_block(x):
    """per_block_cast_to_fp8 as one pass (n and k multiples of 128)."""
    import torch

    blocks = x.float().unflatten(0, (-1, 128)).unflatten(2, (-1, 128))
    scales = blocks.abs().amax(dim=(1, 3)).clamp(min=1e-4) / 448.0
    return (blocks / scales[:, None, :, None]).flatten(2).flatten(0, 1).to(torch.float8_e4m3fn), scales


def one_pass_back(x_fp8, row_scales, dtype):
    """Either cast back as one pass: row_scales holds one scale per row per 128 channels."""
    return (x_fp8.float() * row_scales.repeat_interleave(128, dim=-1)).to(dtype)


def benchmark(ctx):
    import torch

    from dsinfra import fp8
    from dsinfra.testing import randn

    tokens = 512 if ctx.quick else 4096
    x = randn(tokens, HIDDEN, seed=0, dtype=torch.bfloat16, device=ctx.device)
    weight = randn(512 if ctx.quick else WEIGHT_ROWS, HIDDEN, seed=1, dtype=torch.bfloat16, device=ctx.device)
    x_fp8, x_scales = fp8.per_token_cast_to_fp8(x)
    w_fp8, w_scales = fp8.per_block_cast_to_fp8(weight)
    w_row_scales = w_scales.repeat_interleave(128, dim=0)
    cases = [
        ("per_token_cast_to_fp8", x, lambda: fp8.per_token_cast_to_fp8(x), lambda: one_pass_per_token(x)),
        ("per_token_cast_back to bf16", x, lambda: fp8.per_token_cast_back(x_fp8, x_scales, torch.bfloat16),
         lambda: one_pass_back(x_fp8, x_scales, torch.bfloat16)),
        ("per_block_cast_to_fp8", weight, lambda: fp8.per_block_cast_to_fp8(weight), lambda: one_pass_per_block(weight)),
        ("per_block_cast_back to bf16", weight, lambda: fp8.per_block_cast_back(w_fp8, w_scales, torch.bfloat16),
         lambda: one_pass_back(w_fp8, w_row_scales, torch.bfloat16)),
    ]
    for name, tensor, cast, baseline in cases:
        rows, k = tensor.shape
        ctx.measure(
            f"{name} {rows}x{k}",
            cast,
            baseline=baseline,
            baseline_name="one pass",
            bytes=tensor.numel() * 3,  # bf16 in, FP8 out (or the reverse); the scales are 1/256 of it
            params=dict(rows=rows, k=k),
        )
