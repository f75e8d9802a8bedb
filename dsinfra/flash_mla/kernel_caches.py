"""KV caches laid out as the Triton decoding kernels address them.

The kernels of :mod:`dsinfra.flash_mla.triton_impl` find slot ``s`` at
``s * k_cache.stride(1)``, which needs blocks exactly ``page_block_size``
tokens apart, and read the V3.2 FP8 layout or a plain cache. Other caches are
brought to that form before the call, exactly:

- sparse attention over a cache whose blocks lie further apart (a slice of a
  larger buffer, as FlashMLA's tests make them) but a whole number of token
  strides: a view with one token per block over the same storage, and the
  indices renumbered (no copy of the cache);
- sparse attention over a MODEL1-layout cache: the tokens the indices name
  are gathered and dequantised to q's dtype into a small plain cache, and the
  indices renumbered to it (``batch * seq_len_q * topk`` tokens);
- anything else (dense attention over such caches): a contiguous (and, for
  MODEL1, dequantised) copy of the cache.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from dsinfra.flash_mla.fp8_cache import dequantize_k_cache, fp8_layout
from dsinfra.flash_mla.paged_cache import gather_tokens


def _addressable(k_cache: torch.Tensor) -> bool:
    num_blocks, page, num_heads_k, entry = k_cache.shape
    return (
        k_cache.stride(3) == 1
        and (num_heads_k == 1 or k_cache.stride(2) == entry)
        and (num_blocks == 1 or k_cache.stride(0) == page * k_cache.stride(1))
    )


def for_kernels(
    k_cache: torch.Tensor, indices: torch.Tensor | None, head_dim: int, head_dim_v: int, is_fp8: bool, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor | None, bool]:
    """(k_cache, indices, is_fp8) for the Triton kernels, equivalent to the arguments."""
    model1 = is_fp8 and fp8_layout(head_dim, head_dim_v, k_cache.shape[-1]) == "model1"
    if not model1 and _addressable(k_cache):
        return k_cache, indices, is_fp8
    num_blocks, page, num_heads_k, entry = k_cache.shape
    if indices is not None and model1:
        valid = indices >= 0
        tokens = gather_tokens(k_cache, indices.clamp(min=0).long().flatten(), head_dim, head_dim_v, True, dtype)
        renumbered = torch.arange(indices.numel(), dtype=torch.int32, device=indices.device).view(indices.shape)
        return tokens[:, None], torch.where(valid, renumbered, -1), False
    token_stride, block_stride = k_cache.stride(1), k_cache.stride(0)
    entry_contiguous = k_cache.stride(3) == 1 and (num_heads_k == 1 or k_cache.stride(2) == entry)
    if indices is not None and entry_contiguous and token_stride > 0 and block_stride % token_stride == 0:
        per_block = block_stride // token_stride
        rows = (num_blocks - 1) * per_block + page
        one_token_blocks = k_cache.as_strided((rows, 1, num_heads_k, entry), (token_stride, token_stride, entry, 1))
        renumbered = (indices // page) * per_block + indices % page
        return one_token_blocks, torch.where(indices >= 0, renumbered, -1), is_fp8
    if model1:
        return dequantize_k_cache(k_cache, head_dim, head_dim_v, dtype), indices, False
    return k_cache.contiguous(), indices, is_fp8


def addressing_caches(core: Callable[..., tuple[torch.Tensor, torch.Tensor]]) -> Callable[..., tuple[torch.Tensor, torch.Tensor]]:
    """``core`` (the Triton ``flash_mla_with_kvcache``) taking any cache the public API accepts."""

    def call(q, k_cache, block_table, cache_seqlens, head_dim_v, tile_scheduler_metadata, num_splits, softmax_scale,
             causal, is_fp8_kvcache, indices):
        k_cache, indices, is_fp8_kvcache = for_kernels(k_cache, indices, q.shape[-1], head_dim_v, is_fp8_kvcache, q.dtype)
        return core(q, k_cache, block_table, cache_seqlens, head_dim_v, tile_scheduler_metadata, num_splits, softmax_scale,
                    causal, is_fp8_kvcache, indices)

    return call
