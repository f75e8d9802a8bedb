"""FlashMLA's FP8 KV cache layouts: DeepSeek-V3.2's 656 bytes per token, and
the 584-byte "MODEL1" layout of FlashMLA's newest sparse kernels.

**V3.2 layout** (``layout="v32"``, any head dims). For each token and KV head, the
last dimension of the cache holds, in order:

- ``head_dim_v`` float8_e4m3fn values: the quantised "NoPE" channels (V, and
  the first ``head_dim_v`` channels of K);
- ``ceil(head_dim_v / 128)`` float32 scales, one per 128 NoPE channels
  (``value ≈ fp8.float() * scale``, the scaling of :mod:`dsinfra.fp8`);
- ``head_dim - head_dim_v`` bfloat16 values: the RoPE channels, kept unquantised.

For head_dim 576 and head_dim_v 512 that is 512 + 4 * 4 + 64 * 2 = 656 bytes,
upstream's format. Other sizes follow the same rule (160/128: 196 bytes); the
float32 and bfloat16 fields must stay aligned, so head_dim_v must be a multiple
of 4 and head_dim - head_dim_v even. Any float32 scales are read, upstream's
power-of-two (UE8M0) ones included.

**MODEL1 layout** (``layout="model1"``: head_dim 512 = 448 NoPE + 64 RoPE
channels, head_dim_v 512, one KV head). The cache is
``[num_blocks, page_block_size, 1, 584]``, each block's bytes contiguous, but a
block is laid out by field, not by token: first every token's 576 bytes (448
float8_e4m3fn NoPE values, then 64 bfloat16 RoPE values), then every token's 8
bytes of scales (7 UE8M0 exponents, ``scale = 2 ** (byte - 127)``, one per 64
NoPE channels, and a byte of padding). Blocks may lie further apart than
``page_block_size * 584`` bytes (upstream pads them to a multiple of 576).

Reading a cache means dequantising the NoPE channels to the query's dtype
(``(fp8 * scale)`` rounded to bf16 for bf16 queries), as the upstream kernels
do before their bf16 matmuls.
"""

from __future__ import annotations

import torch

from dsinfra.fp8 import FP8_MAX, GROUP, fp8_to_float, per_token_cast_back, per_token_cast_to_fp8
from dsinfra.validation import check_tensor

LAYOUTS = ("v32", "model1")
MODEL1_HEAD_DIM = 512  # head_dim (and head_dim_v) of the MODEL1 layout
MODEL1_NOPE = 448  # quantised channels
MODEL1_TILE = 64  # NoPE channels per scale
MODEL1_DATA_BYTES = MODEL1_NOPE + 2 * (MODEL1_HEAD_DIM - MODEL1_NOPE)  # 576: NoPE then bf16 RoPE
MODEL1_SCALE_BYTES = 8  # 7 UE8M0 exponents and a byte of padding
MODEL1_BYTES_PER_TOKEN = MODEL1_DATA_BYTES + MODEL1_SCALE_BYTES  # 584
_AMAX_FLOOR = 1e-4


def num_scales(head_dim_v: int) -> int:
    """Float32 scales per token of the V3.2 layout: one per 128 NoPE channels."""
    return -(-head_dim_v // GROUP)


def bytes_per_token(head_dim: int, head_dim_v: int) -> int:
    """Size of one token's entry (per KV head) in the V3.2 layout: 656 for 576/512."""
    return head_dim_v + 4 * num_scales(head_dim_v) + 2 * (head_dim - head_dim_v)


def check_fp8_dims(head_dim: int, head_dim_v: int) -> None:
    """Raise ValueError unless the V3.2 layout can hold these head dims with its fields aligned."""
    if head_dim_v % 4 or (head_dim - head_dim_v) % 2:
        raise ValueError(
            "the FP8 KV cache needs head_dim_v a multiple of 4 and head_dim - head_dim_v even "
            f"(its float32 scales and bf16 RoPE values must stay aligned); got head_dim {head_dim}, head_dim_v {head_dim_v}"
        )


def fp8_layout(head_dim: int, head_dim_v: int, entry: int, name: str = "k_cache") -> str:
    """The layout (``"v32"`` or ``"model1"``) of an FP8 cache ``name`` of ``entry`` bytes per token.

    Raises ValueError when neither layout has entries of that size for these head dims.
    """
    if (head_dim, head_dim_v, entry) == (MODEL1_HEAD_DIM, MODEL1_HEAD_DIM, MODEL1_BYTES_PER_TOKEN):
        return "model1"
    check_fp8_dims(head_dim, head_dim_v)
    expected = bytes_per_token(head_dim, head_dim_v)
    if entry != expected:
        also = f" (or {MODEL1_BYTES_PER_TOKEN}, the MODEL1 layout)" if (head_dim, head_dim_v) == (512, 512) else ""
        raise ValueError(
            f"{name} must hold {expected} bytes per token{also} for head_dim {head_dim} and head_dim_v {head_dim_v}; "
            f"got {entry}"
        )
    return "v32"


def split_fp8_cache(k_cache: torch.Tensor, head_dim: int, head_dim_v: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Views of the three fields of a V3.2-layout cache, sharing its storage.

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


def model1_blocks(k_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Views of the two fields of a MODEL1-layout cache, sharing its storage.

    k_cache: [num_blocks, page_block_size, 1, 584], float8_e4m3fn or uint8, each block contiguous.
    Returns (data [num_blocks, page_block_size, 576] uint8: NoPE bytes then bf16 RoPE;
    scales [num_blocks, page_block_size, 8] uint8: UE8M0 exponents then padding).
    """
    raw = k_cache.view(torch.uint8)
    num_blocks, page = raw.shape[:2]
    block_stride, start = raw.stride(0), raw.storage_offset()
    data = raw.as_strided((num_blocks, page, MODEL1_DATA_BYTES), (block_stride, MODEL1_DATA_BYTES, 1), start)
    scales = raw.as_strided(
        (num_blocks, page, MODEL1_SCALE_BYTES), (block_stride, MODEL1_SCALE_BYTES, 1), start + page * MODEL1_DATA_BYTES
    )
    return data, scales


def dequantize_model1_tokens(data: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype, out: torch.Tensor | None = None) -> torch.Tensor:
    """Tokens of the MODEL1 layout, gathered: data [..., 576] and scales [..., 8] uint8
    -> [..., 512] in ``dtype`` (NoPE as fp8 * 2 ** (exponent - 127) rounded once, then RoPE)."""
    if out is None:
        out = torch.empty(*data.shape[:-1], MODEL1_HEAD_DIM, dtype=dtype, device=data.device)
    nope = fp8_to_float(data[..., :MODEL1_NOPE].view(torch.float8_e4m3fn))
    exponents = scales[..., : MODEL1_NOPE // MODEL1_TILE].contiguous().view(torch.float8_e8m0fnu).float()
    nope.unflatten(-1, (-1, MODEL1_TILE)).mul_(exponents[..., None])
    out[..., :MODEL1_NOPE] = nope
    out[..., MODEL1_NOPE:] = data[..., MODEL1_NOPE:].contiguous().view(torch.bfloat16)
    return out


def quantize_k_cache(k_cache: torch.Tensor, head_dim_v: int, layout: str = "v32") -> torch.Tensor:
    """Quantise a KV cache into an FP8 layout.

    k_cache: [num_blocks, page_block_size, num_heads_k, head_dim], torch.bfloat16 (or float16/float32).
    layout: ``"v32"`` (any head dims) or ``"model1"`` (head_dim = head_dim_v = 512, one KV head).
    Returns [num_blocks, page_block_size, num_heads_k, bytes per token], torch.float8_e4m3fn,
    contiguous: pass it to ``flash_mla_with_kvcache(..., is_fp8_kvcache=True)``. The RoPE
    channels are stored as bfloat16.
    """
    check_tensor("k_cache", k_cache, dtype=(torch.bfloat16, torch.float16, torch.float32), ndim=4)
    head_dim = k_cache.shape[-1]
    if isinstance(head_dim_v, bool) or not isinstance(head_dim_v, int):
        raise TypeError(f"head_dim_v must be an int; got {type(head_dim_v).__name__}")
    if not 0 < head_dim_v <= head_dim:
        raise ValueError(f"head_dim_v must be in [1, head_dim={head_dim}]; got {head_dim_v}")
    if layout == "model1":
        return _quantize_model1(k_cache, head_dim_v)
    if layout != "v32":
        raise ValueError(f"layout must be one of {', '.join(LAYOUTS)}; got {layout!r}")
    check_fp8_dims(head_dim, head_dim_v)
    packed = torch.empty(*k_cache.shape[:-1], bytes_per_token(head_dim, head_dim_v), dtype=torch.uint8, device=k_cache.device)
    nope, scales, rope = split_fp8_cache(packed, head_dim, head_dim_v)
    nope_fp8, nope_scales = per_token_cast_to_fp8(k_cache[..., :head_dim_v])
    nope.copy_(nope_fp8)
    scales.copy_(nope_scales)
    rope.copy_(k_cache[..., head_dim_v:])
    return packed.view(torch.float8_e4m3fn)


def _quantize_model1(k_cache: torch.Tensor, head_dim_v: int) -> torch.Tensor:
    """:func:`quantize_k_cache` into the MODEL1 layout: power-of-two scales, 2 ** ceil(log2(amax / 448))."""
    num_blocks, page, num_heads_k, head_dim = k_cache.shape
    if (head_dim, head_dim_v, num_heads_k) != (MODEL1_HEAD_DIM, MODEL1_HEAD_DIM, 1):
        raise ValueError(
            "the MODEL1 layout holds head_dim 512 and head_dim_v 512 for one KV head; "
            f"got head_dim {head_dim}, head_dim_v {head_dim_v}, num_heads_k {num_heads_k}"
        )
    packed = torch.zeros(num_blocks, page, 1, MODEL1_BYTES_PER_TOKEN, dtype=torch.uint8, device=k_cache.device)
    data, scales = model1_blocks(packed)
    tiles = k_cache[:, :, 0, :MODEL1_NOPE].float().unflatten(-1, (-1, MODEL1_TILE))  # [blocks, page, 7, 64]
    amax = tiles.abs().amax(dim=-1).clamp_(min=_AMAX_FLOOR)
    scale = torch.exp2(torch.ceil(torch.log2(amax / FP8_MAX)))
    data[..., :MODEL1_NOPE].copy_((tiles / scale[..., None]).flatten(-2).to(torch.float8_e4m3fn).view(torch.uint8))
    data[..., MODEL1_NOPE:].copy_(k_cache[:, :, 0, MODEL1_NOPE:].to(torch.bfloat16).view(torch.uint8))
    scales[..., : MODEL1_NOPE // MODEL1_TILE].copy_(scale.to(torch.float8_e8m0fnu).view(torch.uint8))
    return packed.view(torch.float8_e4m3fn)


def dequantize_k_cache(
    k_cache: torch.Tensor, head_dim: int, head_dim_v: int, dtype: torch.dtype = torch.bfloat16
) -> torch.Tensor:
    """The inverse of :func:`quantize_k_cache`; the layout is told by the entry size.

    k_cache: [num_blocks, page_block_size, num_heads_k, bytes per token], float8_e4m3fn or
    uint8, any strides with each token's entry contiguous (V3.2 rows gathered from a cache,
    [..., bytes per token], are read too; MODEL1 needs whole blocks).
    Returns [..., head_dim] in ``dtype``: the NoPE channels as ``fp8 * scale``
    rounded to ``dtype``, then the RoPE channels.
    """
    check_tensor("k_cache", k_cache, dtype=(torch.float8_e4m3fn, torch.uint8))
    if k_cache.dim() == 0:
        raise ValueError("k_cache must have at least one dimension; got a scalar")
    layout = fp8_layout(head_dim, head_dim_v, k_cache.shape[-1])
    if layout == "model1":
        check_tensor("k_cache", k_cache, shape=("num_blocks", "page_block_size", 1, MODEL1_BYTES_PER_TOKEN))
        data, scales = model1_blocks(k_cache)
        return dequantize_model1_tokens(data, scales, dtype)[:, :, None]
    return dequantize_v32_tokens(k_cache.contiguous(), head_dim, head_dim_v, dtype)


def dequantize_v32_tokens(
    entries: torch.Tensor, head_dim: int, head_dim_v: int, dtype: torch.dtype, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Contiguous V3.2-layout entries [..., bytes_per_token] -> [..., head_dim] in ``dtype``,
    written into ``out`` (contiguous) when given."""
    nope, scales, rope = split_fp8_cache(entries, head_dim, head_dim_v)
    if out is None:
        out = torch.empty(*entries.shape[:-1], head_dim, dtype=dtype, device=entries.device)
    per_token_cast_back(nope, scales, dtype, out=out[..., :head_dim_v])
    out[..., head_dim_v:] = rope
    return out
