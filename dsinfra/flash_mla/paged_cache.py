"""Reading tokens out of a paged KV cache, fast, whatever its layout and strides.

A cache slot is ``block * page_block_size + offset``. The cache tensor
``[num_blocks, page_block_size, num_heads_k, entry]`` may be a slice of a larger
buffer (blocks further apart than ``page_block_size`` tokens, as FlashMLA's
tests make FP8 caches), in one of three layouts: plain (q's dtype), FP8 V3.2,
FP8 MODEL1 (:mod:`dsinfra.flash_mla.fp8_cache`).

Each field of a token (its whole entry; for MODEL1 its data and its scales) is
a run of contiguous bytes at ``block * block_stride + offset * token_stride``.
When the block stride is a multiple of the token stride, the field is a row of
one 2-D strided view of the cache and a gather is one ``index_select`` (a
memcpy per row); otherwise it is advanced indexing over a 3-D view, several
times slower.
"""

from __future__ import annotations

import torch

from dsinfra.flash_mla.fp8_cache import dequantize_model1_tokens, dequantize_v32_tokens, fp8_layout, model1_blocks


def _field_rows(field: torch.Tensor, slots: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    """field[slot // page, slot % page] for a [num_blocks, page, width] view whose rows are contiguous."""
    num_blocks, page, width = field.shape
    block_stride, token_stride = field.stride(0), field.stride(1)
    if page == 1:
        token_stride = block_stride
    if num_blocks == 1:
        block_stride = token_stride * page
    if token_stride > 0 and block_stride % token_stride == 0:
        per_block = block_stride // token_stride
        rows = field.as_strided(((num_blocks - 1) * per_block + page, width), (token_stride, 1), field.storage_offset())
        # blocks side by side (per_block == page): a slot is its row
        index = slots if per_block == page else slots // page * per_block + slots % page
        return torch.index_select(rows, 0, index, out=out) if out is not None else rows.index_select(0, index)
    gathered = field[slots // page, slots % page]
    return out.copy_(gathered) if out is not None else gathered


def gather_tokens(
    k_cache: torch.Tensor, slots: torch.Tensor, head_dim: int, head_dim_v: int, is_fp8: bool, dtype: torch.dtype,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """The cache entries of ``slots`` ([n] int64, each a valid slot), read as [n, num_heads_k, head_dim] in ``dtype``.

    out: a [n, num_heads_k, head_dim] tensor of ``dtype`` to fill (contiguous), else allocated.
    """
    num_blocks, page, num_heads_k, entry = k_cache.shape
    if out is None:
        out = torch.empty(slots.numel(), num_heads_k, head_dim, dtype=dtype, device=k_cache.device)
    if not is_fp8:
        if k_cache.stride(3) == 1 and (num_heads_k == 1 or k_cache.stride(2) == entry):
            field = k_cache.as_strided((num_blocks, page, num_heads_k * entry), k_cache.stride()[:2] + (1,))
            _field_rows(field, slots, out.view(-1, num_heads_k * head_dim))
        else:
            out.copy_(k_cache[slots // page, slots % page])
        return out
    if fp8_layout(head_dim, head_dim_v, entry) == "model1":
        data, scales = model1_blocks(k_cache)
        dequantize_model1_tokens(_field_rows(data, slots, None), _field_rows(scales, slots, None), dtype, out[:, 0])
        return out
    raw = k_cache.view(torch.uint8)
    field = raw.as_strided((num_blocks, page, num_heads_k * entry), raw.stride()[:2] + (1,))
    entries = _field_rows(field, slots, None).view(-1, num_heads_k, entry)
    return dequantize_v32_tokens(entries, head_dim, head_dim_v, dtype, out)
