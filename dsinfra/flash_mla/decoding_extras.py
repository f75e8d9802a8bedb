"""Sparse decoding's extras, composed exactly over an implementation's core attention.

FlashMLA's sparse decoding takes three additions to plain sparse attention
(their meaning is specified in :mod:`dsinfra.flash_mla.reference`). Each is
exact at the level of the public API, so every implementation of the core
``flash_mla_with_kvcache`` (dense or sparse over one cache, no extras) gets them
from here:

- ``topk_length``: index positions ``j >= topk_length[b]`` are ignored, which
  is the same as setting them to -1 (:func:`mask_past_length`);
- an extra KV cache with its own indices: attention over the union of two key
  sets is the merge of the attentions over each by their log-sum-exp
  (:func:`merge_by_lse`): with ``w = exp(lse)``,
  ``out = (w₁ out₁ + w₂ out₂) / (w₁ + w₂)`` and ``lse = log(w₁ + w₂)``;
- ``attn_sink``: a key of score ``attn_sink[h]`` and value 0 in the softmax
  scales ``out`` by ``exp(lse) / (exp(lse) + exp(attn_sink[h]))``, a sigmoid
  of ``lse - attn_sink[h]``, and leaves ``lse`` alone (:func:`apply_attn_sink`).

The merge and the sink work in float32 on the core's outputs, which the core
has rounded to q's dtype: one more rounding than a fused kernel makes.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def mask_past_length(indices: torch.Tensor, topk_length: torch.Tensor | None) -> torch.Tensor:
    """indices [batch, seq_len_q, topk] with positions ``j >= topk_length[b]`` set to -1."""
    if topk_length is None:
        return indices
    past = torch.arange(indices.shape[-1], device=indices.device) >= topk_length[:, None, None]
    return indices.masked_fill(past, -1)


def merge_by_lse(
    out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention over the union of two key sets from the attentions over each.

    out_*: [batch, seq_len_q, num_heads_q, head_dim_v]; lse_*: [batch, num_heads_q, seq_len_q]
    float32, +inf where a query saw nothing (out 0 there). Returns (out float32, lse)
    in the same convention; NaN in either comes out as NaN.
    """
    lse_a = lse_a.masked_fill(lse_a == float("inf"), float("-inf"))
    lse_b = lse_b.masked_fill(lse_b == float("inf"), float("-inf"))
    top = torch.maximum(lse_a, lse_b)
    top = top.masked_fill(top == float("-inf"), 0.0)
    weight_a, weight_b = torch.exp(lse_a - top), torch.exp(lse_b - top)
    total = weight_a + weight_b
    lse = top + total.log()
    total = total.clamp(min=torch.finfo(torch.float32).tiny)
    share_a, share_b = (weight_a / total).transpose(1, 2)[..., None], (weight_b / total).transpose(1, 2)[..., None]
    out = out_a.float() * share_a + out_b.float() * share_b
    return out, lse.masked_fill(lse == float("-inf"), float("inf"))


def apply_attn_sink(out: torch.Tensor, lse: torch.Tensor, attn_sink: torch.Tensor) -> torch.Tensor:
    """out [batch, seq_len_q, num_heads_q, head_dim_v] scaled by exp(lse) / (exp(lse) + exp(attn_sink[h])),
    in float32; queries that saw nothing (lse +inf) keep out = 0."""
    kept = torch.sigmoid(lse - attn_sink[:, None])
    kept = kept.masked_fill(lse == float("inf"), 1.0)
    return out.float() * kept.transpose(1, 2)[..., None]


def flash_mla_with_kvcache(
    core: Callable[..., tuple[torch.Tensor, torch.Tensor]],
    q: torch.Tensor,
    k_cache: torch.Tensor,
    head_dim_v: int,
    plan: tuple[torch.Tensor, torch.Tensor],
    softmax_scale: float,
    is_fp8_kvcache: bool,
    indices: torch.Tensor,
    attn_sink: torch.Tensor | None,
    extra_k_cache: torch.Tensor | None,
    extra_indices_in_kvcache: torch.Tensor | None,
    topk_length: torch.Tensor | None,
    extra_topk_length: torch.Tensor | None,
    extra_plan: tuple[torch.Tensor, torch.Tensor] | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sparse decoding with its extras through ``core`` (an implementation's
    ``flash_mla_with_kvcache``); arguments already checked, as the public function's."""
    out, lse = core(
        q, k_cache, None, None, head_dim_v, *plan, softmax_scale, False, is_fp8_kvcache, mask_past_length(indices, topk_length)
    )
    if extra_k_cache is not None:
        more_out, more_lse = core(
            q, extra_k_cache, None, None, head_dim_v, *extra_plan, softmax_scale, False, is_fp8_kvcache,
            mask_past_length(extra_indices_in_kvcache, extra_topk_length),
        )
        out, lse = merge_by_lse(out, lse, more_out, more_lse)
    if attn_sink is not None:
        out = apply_attn_sink(out, lse, attn_sink)
    return out.to(q.dtype), lse
