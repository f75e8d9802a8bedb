"""The specification of MLA decoding over a paged KV cache: plain PyTorch,
one sequence at a time, in float32.

For each batch entry ``b`` and query position ``i``, the keys are:

- dense: tokens ``0 .. L - 1`` of the sequence (``L = cache_seqlens[b]``), token
  ``t`` living in slot ``t % page_block_size`` of block ``block_table[b, t // page_block_size]``;
  with ``causal``, query ``i`` sees only tokens ``0 .. L - seq_len_q + i``;
- sparse (``indices`` given): the slots ``indices[b, i, :]`` (slot =
  block * page_block_size + offset), entries of -1 ignored.

Query head ``h`` uses KV head ``h // (num_heads_q // num_heads_k)``; V is the
first ``head_dim_v`` channels of K. ``out = softmax(q·Kᵀ · softmax_scale) · V``
and ``lse`` is the natural-log log-sum-exp of the scaled scores. A query that
sees no key at all gets ``out = 0`` and ``lse = +inf``, as upstream's.
"""

from __future__ import annotations

import torch

from dsinfra.flash_mla.fp8_cache import dequantize_k_cache


def flash_mla_with_kvcache(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    block_table: torch.Tensor | None,
    cache_seqlens: torch.Tensor | None,
    head_dim_v: int,
    tile_scheduler_metadata: torch.Tensor,
    num_splits: torch.Tensor,
    softmax_scale: float,
    causal: bool = False,
    is_fp8_kvcache: bool = False,
    indices: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Arguments as :func:`dsinfra.flash_mla.flash_mla_with_kvcache`, already
    checked, with ``softmax_scale`` a float. The split plan is not needed here."""
    batch, seq_len_q, num_heads_q, head_dim = q.shape
    if is_fp8_kvcache:
        k_cache = dequantize_k_cache(k_cache, head_dim, head_dim_v, q.dtype)
    page_block_size, num_heads_k = k_cache.shape[1], k_cache.shape[2]
    slots = k_cache.flatten(0, 1)  # [num_blocks * page_block_size, num_heads_k, head_dim]
    heads_per_k = num_heads_q // num_heads_k
    out = torch.zeros(batch, seq_len_q, num_heads_q, head_dim_v, dtype=torch.float32, device=q.device)
    lse = torch.full((batch, num_heads_q, seq_len_q), float("inf"), dtype=torch.float32, device=q.device)
    positions = torch.arange(seq_len_q, device=q.device)
    for b in range(batch):
        if indices is None:
            length = int(cache_seqlens[b])
            tokens = torch.arange(length, device=q.device)
            token_slots = block_table[b, tokens // page_block_size].long() * page_block_size + tokens % page_block_size
            keys = slots[token_slots].float().transpose(0, 1)[None]  # [1, num_heads_k, length, head_dim]
            visible = torch.ones(seq_len_q, length, dtype=torch.bool, device=q.device)
            if causal:
                visible = tokens[None, :] <= (length - seq_len_q + positions)[:, None]
        else:
            visible = indices[b] >= 0  # [seq_len_q, topk]
            gathered = slots[indices[b].long().clamp(min=0)].float()  # [seq_len_q, topk, num_heads_k, head_dim]
            keys = torch.where(visible[:, :, None, None], gathered, 0.0).transpose(1, 2)
        query = q[b].float().view(seq_len_q, num_heads_k, heads_per_k, head_dim)
        scores = torch.matmul(query, keys.transpose(-1, -2)) * softmax_scale  # [seq_len_q, num_heads_k, heads_per_k, n]
        scores = scores.masked_fill(~visible[:, None, None, :], float("-inf"))
        row_lse = scores.logsumexp(dim=-1)  # [seq_len_q, num_heads_k, heads_per_k]
        seen_nothing = row_lse == float("-inf")
        row_lse = row_lse.masked_fill(seen_nothing, float("inf"))  # exp(scores - inf) = 0: such rows give out = 0
        weights = torch.exp(scores - row_lse[..., None])
        out[b] = torch.matmul(weights, keys[..., :head_dim_v]).reshape(seq_len_q, num_heads_q, head_dim_v)
        lse[b] = row_lse.reshape(seq_len_q, num_heads_q).t()
    return out.to(q.dtype), lse
