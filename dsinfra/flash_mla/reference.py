"""The specification of FlashMLA's operations: plain PyTorch, one sequence (or
query) at a time, in float32.

**Decoding** (:func:`flash_mla_with_kvcache`). For each batch entry ``b`` and
query position ``i``, the keys are:

- dense: tokens ``0 .. L - 1`` of the sequence (``L = cache_seqlens[b]``), token
  ``t`` living in slot ``t % page_block_size`` of block ``block_table[b, t // page_block_size]``;
  with ``causal``, query ``i`` sees only tokens ``0 .. L - seq_len_q + i``;
- sparse (``indices`` given): the slots ``indices[b, i, j]`` (slot =
  block * page_block_size + offset) for ``j < topk_length[b]`` (every ``j``
  without ``topk_length``), entries of -1 ignored; then, with an extra cache,
  the slots ``extra_indices_in_kvcache[b, i, j]`` of ``extra_k_cache`` for
  ``j < extra_topk_length[b]`` likewise. Both sets form one softmax.

Query head ``h`` uses KV head ``h // (num_heads_q // num_heads_k)``; V is the
first ``head_dim_v`` channels of K. ``out = softmax(q·Kᵀ · softmax_scale) · V``
and ``lse`` is the natural-log log-sum-exp of the scaled scores. With
``attn_sink`` (one float32 per query head), ``out`` is then multiplied by
``exp(lse) / (exp(lse) + exp(attn_sink[h]))``, as if a key of score
``attn_sink[h]`` and value 0 joined the softmax; ``lse`` stays as it was
(+inf in the sink makes out 0, -inf leaves it alone). A query that sees no key
at all gets ``out = 0`` and ``lse = +inf``, as upstream's. NaN in a query
comes out as NaN.

**Sparse prefill** (:func:`flash_mla_sparse_fwd`). Query ``s`` with head ``h``
attends to the rows ``indices[s, g, j]`` of ``kv[:, g]`` (``g`` the KV head of
``h``) for ``j < topk_length[s]``; an index outside ``[0, s_kv)`` is ignored.
Besides ``out`` (with the same attention sink) and ``lse``, it returns
``max_logits``, the largest scaled score of each (query, head), -inf when none.
"""

from __future__ import annotations

import torch

from dsinfra.flash_mla.fp8_cache import dequantize_k_cache


def _attend(
    query: torch.Tensor, keys: torch.Tensor, visible: torch.Tensor, softmax_scale: float, head_dim_v: int,
    attn_sink: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """query: [..., rows, head_dim] float32; keys: [..., n, head_dim] float32; visible: [..., rows or 1, n] bool;
    attn_sink: [rows] float32 or None. Returns (out [..., rows, head_dim_v], lse [..., rows] with +inf
    where a row sees nothing, max_logits [..., rows] with -inf there), float32."""
    keys = torch.where(visible.any(dim=-2)[..., None], keys, 0.0)  # keys no row may see could hold NaN
    scores = torch.matmul(query, keys.transpose(-1, -2)) * softmax_scale
    scores = scores.masked_fill(~visible, float("-inf"))
    max_logits = scores.amax(dim=-1) if scores.shape[-1] else scores.new_full(scores.shape[:-1], float("-inf"))
    lse = scores.logsumexp(dim=-1)
    sees_nothing = lse == float("-inf")
    lse = lse.masked_fill(sees_nothing, float("inf"))  # exp(scores - inf) = 0: such rows give out = 0
    out = torch.matmul(torch.exp(scores - lse[..., None]), keys[..., :head_dim_v])
    if attn_sink is not None:
        kept = torch.sigmoid(lse - attn_sink)  # exp(lse) / (exp(lse) + exp(attn_sink))
        out = out * torch.where(sees_nothing, 1.0, kept)[..., None]
    return out, lse, max_logits


def _slots_to_tokens(cache: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """cache [num_blocks, page_block_size, num_heads_k, head_dim] read at ``slots`` (any shape, >= 0)."""
    page = cache.shape[1]
    return cache[slots // page, slots % page].float()


def _readable(k_cache: torch.Tensor, head_dim: int, head_dim_v: int, is_fp8_kvcache: bool, dtype: torch.dtype) -> torch.Tensor:
    return dequantize_k_cache(k_cache, head_dim, head_dim_v, dtype) if is_fp8_kvcache else k_cache


def _sparse_keys(
    cache: torch.Tensor, indices: torch.Tensor, topk_length: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys [seq_len_q, topk, num_heads_k, head_dim] and which are valid [seq_len_q, topk] of one batch entry."""
    valid = indices >= 0
    if topk_length is not None:
        valid &= torch.arange(indices.shape[-1], device=indices.device) < topk_length
    return _slots_to_tokens(cache, indices.long().clamp(min=0)), valid


def flash_mla_with_kvcache(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    block_table: torch.Tensor | None,
    cache_seqlens: torch.Tensor | None,
    head_dim_v: int,
    tile_scheduler_metadata: torch.Tensor | None,
    num_splits: torch.Tensor | None,
    softmax_scale: float,
    causal: bool = False,
    is_fp8_kvcache: bool = False,
    indices: torch.Tensor | None = None,
    attn_sink: torch.Tensor | None = None,
    extra_k_cache: torch.Tensor | None = None,
    extra_indices_in_kvcache: torch.Tensor | None = None,
    topk_length: torch.Tensor | None = None,
    extra_topk_length: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Arguments as :func:`dsinfra.flash_mla.flash_mla_with_kvcache`, already
    checked, with ``softmax_scale`` a float. The split plan is not needed here."""
    batch, seq_len_q, num_heads_q, head_dim = q.shape
    cache = _readable(k_cache, head_dim, head_dim_v, is_fp8_kvcache, q.dtype)
    extra = None if extra_k_cache is None else _readable(extra_k_cache, head_dim, head_dim_v, is_fp8_kvcache, q.dtype)
    num_heads_k = cache.shape[2]
    heads_per_k = num_heads_q // num_heads_k
    out = torch.zeros(batch, seq_len_q, num_heads_q, head_dim_v, dtype=torch.float32, device=q.device)
    lse = torch.full((batch, num_heads_q, seq_len_q), float("inf"), dtype=torch.float32, device=q.device)
    positions = torch.arange(seq_len_q, device=q.device)
    sink = None if attn_sink is None else attn_sink.view(num_heads_k, heads_per_k)
    for b in range(batch):
        if indices is None:
            length = int(cache_seqlens[b])
            tokens = torch.arange(length, device=q.device)
            slots = block_table[b, tokens // cache.shape[1]].long() * cache.shape[1] + tokens % cache.shape[1]
            keys = _slots_to_tokens(cache, slots).transpose(0, 1)[None]  # [1, num_heads_k, length, head_dim]
            visible = torch.ones(seq_len_q, length, dtype=torch.bool, device=q.device)
            if causal:
                visible = tokens[None, :] <= (length - seq_len_q + positions)[:, None]
        else:
            keys, visible = _sparse_keys(cache, indices[b], None if topk_length is None else topk_length[b])
            if extra is not None:
                more_keys, more_visible = _sparse_keys(
                    extra, extra_indices_in_kvcache[b], None if extra_topk_length is None else extra_topk_length[b]
                )
                keys, visible = torch.cat([keys, more_keys], dim=1), torch.cat([visible, more_visible], dim=1)
            keys = keys.transpose(1, 2)  # [seq_len_q, num_heads_k, n, head_dim]
        query = q[b].float().view(seq_len_q, num_heads_k, heads_per_k, head_dim)
        row_out, row_lse, _ = _attend(query, keys, visible[:, None, None, :], softmax_scale, head_dim_v, sink)
        out[b] = row_out.reshape(seq_len_q, num_heads_q, head_dim_v)
        lse[b] = row_lse.reshape(seq_len_q, num_heads_q).t()
    return out.to(q.dtype), lse


def flash_mla_sparse_fwd(
    q: torch.Tensor,
    kv: torch.Tensor,
    indices: torch.Tensor,
    sm_scale: float,
    d_v: int,
    attn_sink: torch.Tensor | None = None,
    topk_length: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Arguments as :func:`dsinfra.flash_mla.flash_mla_sparse_fwd`, already checked.
    Returns (out [s_q, h_q, d_v] in q's dtype, max_logits [s_q, h_q], lse [s_q, h_q] float32)."""
    s_q, h_q, d_qk = q.shape
    s_kv, h_kv, _ = kv.shape
    heads_per_kv = h_q // h_kv
    out = torch.zeros(s_q, h_q, d_v, dtype=torch.float32, device=q.device)
    lse = torch.empty(s_q, h_q, dtype=torch.float32, device=q.device)
    max_logits = torch.empty(s_q, h_q, dtype=torch.float32, device=q.device)
    sink = None if attn_sink is None else attn_sink.view(h_kv, heads_per_kv)
    positions = torch.arange(indices.shape[-1], device=q.device)
    for s in range(s_q):
        rows = indices[s].long()  # [h_kv, topk]
        visible = (rows >= 0) & (rows < s_kv)
        if topk_length is not None:
            visible &= positions < topk_length[s]
        keys = kv[rows.clamp(0, s_kv - 1), torch.arange(h_kv, device=q.device)[:, None]].float()  # [h_kv, topk, d_qk]
        query = q[s].float().view(h_kv, heads_per_kv, d_qk)
        row_out, row_lse, row_max = _attend(query, keys, visible[:, None, :], sm_scale, d_v, sink)
        out[s], lse[s], max_logits[s] = row_out.reshape(h_q, d_v), row_lse.reshape(h_q), row_max.reshape(h_q)
    return out.to(q.dtype), max_logits, lse
