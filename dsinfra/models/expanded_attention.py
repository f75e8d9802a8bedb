"""Attention over MLA's expanded per-head keys and values, through PyTorch's
fused kernel.

MLA's keys are wider than its values (NoPE + RoPE channels against V's), and
``F.scaled_dot_product_attention`` takes its fused (flash) path only when q,
k and v have the same width and four dimensions; otherwise it falls back to
the math path, which materialises every score and its causal mask and costs
most of a CPU prefill. :func:`expanded_attention` pads the narrower of the two
widths with zero channels (zeros in q and k add nothing to a score; zeros in v
give output channels that are dropped again), so no value changes. On a CPU,
bfloat16 and float16 inputs are attended in float32 (exact conversions): the
fused CPU kernel's reduced-precision arithmetic strays further from a bf16
model's eager attention than float32 does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def expanded_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Causal attention (or, with ``mask``, attention where ``mask`` is True).

    q, k: [batch, heads, length, qk_dim]; v: [batch, heads, length, v_dim];
    mask: a boolean [length, length] or broadcastable, or None for causal.
    Returns [batch, heads, length, v_dim].
    """
    dtype = q.dtype
    if q.device.type == "cpu" and dtype in (torch.bfloat16, torch.float16):
        q, k, v = q.float(), k.float(), v.float()
    qk_dim, v_dim = q.shape[-1], v.shape[-1]
    if v_dim < qk_dim:
        v = F.pad(v, (0, qk_dim - v_dim))
    elif qk_dim < v_dim:
        q, k = F.pad(q, (0, v_dim - qk_dim)), F.pad(k, (0, v_dim - qk_dim))
    if mask is None:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
    else:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    return out[..., :v_dim].to(dtype)
