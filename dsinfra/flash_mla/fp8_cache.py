"""FlashMLA's FP8 KV cache layout: 656 bytes per token for DeepSeek-V3's heads.

For each token and KV head, the last dimension of the cache holds, in order:

- ``head_dim_v`` float8_e4m3fn values: the quantised "NoPE" channels (V, and
  the first ``head_dim_v`` channels of K);
- ``ceil(head_dim_v / 128)`` float32 scales, one per 128 NoPE channels
  (``value ≈ fp8.float() * scale``, the scaling of :mod:`dsinfra.fp8`);
- ``head_dim - head_dim_v`` bfloat16 values: the RoPE channels, kept unquantised.

For head_dim 576 and head_dim_v 512 that is 512 + 4 * 4 + 64 * 2 = 656 bytes,
upstream's format. Other sizes follow the same rule (160/128: 196 bytes); the
float32 and bfloat16 fields must stay aligned, so head_dim_v must be a multiple
of 4 and head_dim - head_dim_v even.

Reading the cache means dequantising the NoPE channels to the query's dtype
(``(fp8 * scale)`` rounded to bf16 for bf16 queries), as the upstream kernel
does before its bf16 matmuls.
"""

from __future__ import annotations

import torch

from dsinfra.fp8 import GROUP, per_token_cast_back, per_token_cast_to_fp8
from dsinfra.validation import check_tensor


def num_scales(head_dim_v: int) -> int:
    """Float32 scales per token: one per 128 NoPE channels."""
    return -(-head_dim_v // GROUP)


def bytes_per_token(head_dim: int, head_dim_v: int) -> int:
    """Size of one token's entry (per KV head) in the FP8 cache: 656 for 576/512."""
    return head_dim_v + 4 * num_scales(head_dim_v) + 2 * (head_dim - head_dim_v)


def check_fp8_dims(head_dim: int, head_dim_v: int) -> None:
    """Raise ValueError unless the FP8 layout can hold these head dims with its fields aligned."""
    if head_dim_v % 4 or (head_dim - head_dim_v) % 2:
        raise ValueError(
            "the FP8 KV cache needs head_dim_v a multiple of 4 and head_dim - head_dim_v even "
            f"(its float32 scales and bf16 RoPE values must stay aligned); got head_dim {head_dim}, head_dim_v {head_dim_v}"
        )


def split_fp8_cache(k_cache: torch.Tensor, head_dim: int, head_dim_v: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Views of the three fields of an FP8 cache, sharing its storage.

    k_cache: [..., bytes_per_token(head_dim, head_dim_v)], torch.float8_e4m3fn or torch.uint8.
    Returns (nope [..., head_dim_v] float8_e4m3fn, scales [..., ceil(head_dim_v / 128)] float32,
    rope [..., head_dim - head_dim_v] bfloat16).
    """
    raw = k_cache.view(torch.uint8)
    scales_end = head_dim_v + 4 * num_scales(head_dim_v)
    nope = raw[..., :head_dim_v].view(torch.float8_e4m3fn)
    scales = raw[..., head_dim_v:scales_end].view(torch.float32)
    rope = raw[..., scales_end:].view(torch.bfloat16)
    return nope, scales, rope


def quantize_k_cache(k_cache: torch.Tensor, head_dim_v: int) -> torch.Tensor:
    """Quantise a KV cache into the FP8 layout.

    k_cache: [num_blocks, page_block_size, num_heads_k, head_dim], torch.bfloat16 (or float16/float32).
    Returns [num_blocks, page_block_size, num_heads_k, bytes_per_token], torch.float8_e4m3fn:
    pass it to ``flash_mla_with_kvcache(..., is_fp8_kvcache=True)``. The RoPE
    channels are stored as bfloat16.
    """
    check_tensor("k_cache", k_cache, dtype=(torch.bfloat16, torch.float16, torch.float32), ndim=4)
    head_dim = k_cache.shape[-1]
    if not 0 < head_dim_v <= head_dim:
        raise ValueError(f"head_dim_v must be in [1, head_dim={head_dim}]; got {head_dim_v}")
    check_fp8_dims(head_dim, head_dim_v)
    packed = torch.empty(*k_cache.shape[:-1], bytes_per_token(head_dim, head_dim_v), dtype=torch.uint8, device=k_cache.device)
    nope, scales, rope = split_fp8_cache(packed, head_dim, head_dim_v)
    nope_fp8, nope_scales = per_token_cast_to_fp8(k_cache[..., :head_dim_v])
    nope.copy_(nope_fp8)
    scales.copy_(nope_scales)
    rope.copy_(k_cache[..., head_dim_v:])
    return packed.view(torch.float8_e4m3fn)


def dequantize_k_cache(
    k_cache: torch.Tensor, head_dim: int, head_dim_v: int, dtype: torch.dtype = torch.bfloat16
) -> torch.Tensor:
    """The inverse of :func:`quantize_k_cache`, also for gathered rows.

    k_cache: [..., bytes_per_token(head_dim, head_dim_v)], float8_e4m3fn or uint8.
    Returns [..., head_dim] in ``dtype``: the NoPE channels as ``fp8 * scale``
    rounded to ``dtype``, then the RoPE channels.
    """
    check_fp8_dims(head_dim, head_dim_v)
    check_tensor("k_cache", k_cache, dtype=(torch.float8_e4m3fn, torch.uint8))
    expected = bytes_per_token(head_dim, head_dim_v)
    if k_cache.dim() == 0 or k_cache.shape[-1] != expected:
        raise ValueError(
            f"k_cache must hold {expected} bytes per token for head_dim {head_dim} and head_dim_v {head_dim_v}; "
            f"got shape {list(k_cache.shape)}"
        )
    nope, scales, rope = split_fp8_cache(k_cache, head_dim, head_dim_v)
    out = torch.empty(*k_cache.shape[:-1], head_dim, dtype=dtype, device=k_cache.device)
    per_token_cast_back(nope, scales, dtype, out=out[..., :head_dim_v])
    out[..., head_dim_v:] = rope
    return out
