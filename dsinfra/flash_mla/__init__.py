"""MLA decoding over a paged KV cache, with FlashMLA's API (deepseek-ai/FlashMLA).

    tile_scheduler_metadata, num_splits = get_mla_metadata(cache_seqlens, seq_len_q * num_heads_q // num_heads_k, num_heads_k)
    for layer in layers:
        out, lse = flash_mla_with_kvcache(q, k_cache[layer], block_table, cache_seqlens, head_dim_v,
                                          tile_scheduler_metadata, num_splits, causal=True)

Implementations: ``reference.py`` (the specification), ``torch_impl.py`` (the
CPU path), ``triton_impl.py`` (the GPU path); ``dsinfra.backend`` picks one per
call. See docs/flash_mla.md.
"""

from __future__ import annotations

import numbers

import torch

from dsinfra import backend
from dsinfra.flash_mla.fp8_cache import bytes_per_token, check_fp8_dims, dequantize_k_cache, quantize_k_cache
from dsinfra.flash_mla.metadata import get_mla_metadata
from dsinfra.validation import check_range, check_tensor

__all__ = ["OPERATIONS", "dequantize_k_cache", "flash_mla_with_kvcache", "get_mla_metadata", "quantize_k_cache"]

OPERATIONS = ("flash_mla_with_kvcache",)


def flash_mla_with_kvcache(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    block_table: torch.Tensor | None,
    cache_seqlens: torch.Tensor | None,
    head_dim_v: int,
    tile_scheduler_metadata: torch.Tensor,
    num_splits: torch.Tensor,
    softmax_scale: float | None = None,
    causal: bool = False,
    is_fp8_kvcache: bool = False,
    indices: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of a few new queries per sequence over a paged KV cache (MLA: V is part of K).

    q: [batch, seq_len_q, num_heads_q, head_dim], torch.bfloat16 or torch.float16.
    k_cache: [num_blocks, page_block_size, num_heads_k, head_dim] in q's dtype, contiguous;
        V is its first head_dim_v channels. With ``is_fp8_kvcache``:
        [num_blocks, page_block_size, num_heads_k, bytes_per_token], torch.float8_e4m3fn
        (or uint8), as :func:`quantize_k_cache` makes it (656 bytes for 576/512).
    block_table: [batch, max_blocks_per_seq], torch.int32: sequence b's token t lives in
        block ``block_table[b, t // page_block_size]``. Entries past a sequence's
        length are never read. Not needed (may be None) with ``indices``.
    cache_seqlens: [batch], torch.int32, each sequence's length. Not needed with ``indices``.
    head_dim_v: channels of V (512 for DeepSeek-V3), at most head_dim.
    tile_scheduler_metadata, num_splits: from :func:`get_mla_metadata` for this batch.
    softmax_scale: scale of q·Kᵀ before the softmax; default head_dim ** -0.5.
    causal: with seq_len_q > 1 (speculative decoding), query i of a sequence of
        length L sees keys 0 .. L - seq_len_q + i.
    is_fp8_kvcache: k_cache is in the FP8 layout of :mod:`dsinfra.flash_mla.fp8_cache`.
    indices: [batch, seq_len_q, topk], torch.int32, token-level sparse attention:
        query (b, i) attends to the slots ``indices[b, i]`` (slot = block *
        page_block_size + offset); -1 entries are ignored. Not with ``causal``.

    Returns (out [batch, seq_len_q, num_heads_q, head_dim_v] in q's dtype,
    softmax_lse [batch, num_heads_q, seq_len_q] torch.float32, natural log).
    A query that sees no key gets out = 0 and lse = +inf. Cache slots past a
    sequence's length (or not in ``indices``) may hold anything, NaN included.
    """
    _check_arguments(
        q, k_cache, block_table, cache_seqlens, head_dim_v, tile_scheduler_metadata, num_splits,
        softmax_scale, causal, is_fp8_kvcache, indices,
    )
    if softmax_scale is None:
        softmax_scale = q.shape[-1] ** -0.5
    impl = backend.load(__name__, backend.choose("flash_mla_with_kvcache", q.device))
    return impl.flash_mla_with_kvcache(
        q, k_cache, block_table, cache_seqlens, head_dim_v, tile_scheduler_metadata, num_splits,
        float(softmax_scale), causal, is_fp8_kvcache, indices,
    )


def _check_arguments(
    q, k_cache, block_table, cache_seqlens, head_dim_v, tile_scheduler_metadata, num_splits,
    softmax_scale, causal, is_fp8_kvcache, indices,
) -> None:
    """Raise TypeError/ValueError naming the first bad argument."""
    check_tensor("q", q, dtype=(torch.bfloat16, torch.float16), shape=("batch", "seq_len_q", "num_heads_q", "head_dim"))
    batch, seq_len_q, num_heads_q, head_dim = q.shape
    if min(q.shape) == 0:
        raise ValueError(f"q must have no empty dimension; got shape {list(q.shape)}")
    device = q.device
    for name, flag in (("causal", causal), ("is_fp8_kvcache", is_fp8_kvcache)):
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be a bool; got {type(flag).__name__}")
    if isinstance(head_dim_v, bool) or not isinstance(head_dim_v, int):
        raise TypeError(f"head_dim_v must be an int; got {type(head_dim_v).__name__}")
    if not 0 < head_dim_v <= head_dim:
        raise ValueError(f"head_dim_v must be in [1, head_dim={head_dim}]; got {head_dim_v}")
    if softmax_scale is not None and (isinstance(softmax_scale, bool) or not isinstance(softmax_scale, numbers.Real)):
        raise TypeError(f"softmax_scale must be a float or None; got {type(softmax_scale).__name__}")

    if is_fp8_kvcache:
        check_fp8_dims(head_dim, head_dim_v)
        entry = bytes_per_token(head_dim, head_dim_v)
        check_tensor("k_cache", k_cache, dtype=(torch.float8_e4m3fn, torch.uint8),
                     shape=("num_blocks", "page_block_size", "num_heads_k", entry), device=device, contiguous=True)
    else:
        check_tensor("k_cache", k_cache, dtype=q.dtype,
                     shape=("num_blocks", "page_block_size", "num_heads_k", head_dim), device=device, contiguous=True)
    num_blocks, page_block_size, num_heads_k, _ = k_cache.shape
    if min(num_blocks, page_block_size, num_heads_k) == 0:
        raise ValueError(f"k_cache must have no empty dimension; got shape {list(k_cache.shape)}")
    if num_heads_q % num_heads_k:
        raise ValueError(
            f"num_heads_q ({num_heads_q}, q's dimension 2) must be a multiple of "
            f"num_heads_k ({num_heads_k}, k_cache's dimension 2)"
        )
    check_range_here = backend.range_checks_enabled(device)

    if indices is None:
        check_tensor("block_table", block_table, dtype=torch.int32, shape=(batch, "max_blocks_per_seq"), device=device)
        check_tensor("cache_seqlens", cache_seqlens, dtype=torch.int32, shape=(batch,), device=device)
        capacity = block_table.shape[1] * page_block_size
        check_range("cache_seqlens", cache_seqlens, 0, capacity + 1)
        if check_range_here:
            blocks_used = (cache_seqlens.long() + page_block_size - 1) // page_block_size
            used = torch.arange(block_table.shape[1], device=device)[None, :] < blocks_used[:, None]
            check_range("block_table", block_table[used], 0, num_blocks)
        sequences = batch
    else:
        check_tensor("indices", indices, dtype=torch.int32, shape=(batch, seq_len_q, "topk"), device=device)
        if indices.shape[2] == 0:
            raise ValueError("indices must have topk >= 1; got shape " + str(list(indices.shape)))
        if causal:
            raise ValueError("causal must be False with indices (sparse attention selects its tokens itself)")
        check_range("indices", indices, 0, num_blocks * page_block_size, ignore=-1)
        sequences = batch * seq_len_q

    check_tensor("tile_scheduler_metadata", tile_scheduler_metadata, dtype=torch.int32, shape=("num_rows", 3), device=device)
    check_tensor("num_splits", num_splits, dtype=torch.int32, shape=(sequences + 1,), device=device)
    if check_range_here:
        check_range("tile_scheduler_metadata", tile_scheduler_metadata[:, 0], 0, sequences, ignore=-1)
        check_range("num_splits", num_splits, 0, tile_scheduler_metadata.shape[0] + 1)
