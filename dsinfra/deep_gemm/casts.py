"""FP8 casts with DeepGEMM's signatures: per token, per channel, per block and over
chosen dimensions, with float32 or UE8M0 (power-of-two) scales.

Each group of values is scaled by ``amax / 448`` (amax floored at 1e-4), rounded
up to a power of two with ``use_ue8m0`` (:func:`dsinfra.deep_gemm.ue8m0.ceil_to_ue8m0`);
``x ≈ x_fp8.float() * scale``. Groups are ``gran_k`` wide (128 by default); a
last narrower group is scaled by its own amax. With the defaults (float32
scales, groups of 128) per-token and per-block casts are those of
:mod:`dsinfra.fp8`.
"""

from __future__ import annotations

import torch

from dsinfra import fp8
from dsinfra.deep_gemm.ue8m0 import ceil_to_ue8m0, pack_ue8m0_to_int
from dsinfra.deep_gemm.utils import align
from dsinfra.fp8 import FP8_MAX, GROUP
from dsinfra.validation import check_positive, check_tensor

_FLOATS = (torch.float32, torch.bfloat16, torch.float16)
_AMAX_FLOOR = 1e-4


def _scales(amax: torch.Tensor, use_ue8m0: bool) -> torch.Tensor:
    scales = amax.clamp(min=_AMAX_FLOOR) / FP8_MAX
    return ceil_to_ue8m0(scales) if use_ue8m0 else scales


def _pad(x: torch.Tensor, dim: int, multiple: int) -> torch.Tensor:
    """x zero-padded along ``dim`` to a multiple of ``multiple``."""
    pad = [0, 0] * (x.dim() - 1 - dim % x.dim()) + [0, align(x.shape[dim], multiple) - x.shape[dim]]
    return torch.nn.functional.pad(x, pad)


def per_token_cast_to_fp8(
    x: torch.Tensor, use_ue8m0: bool = False, gran_k: int = GROUP, use_packed_ue8m0: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """x: [..., k] float -> (float8_e4m3fn [..., k], scales): one scale per row per
    ``gran_k`` of k, float32 ``[..., ceil(k/gran_k)]``; with ``use_packed_ue8m0``
    (needs ``use_ue8m0``) four UE8M0 scales per int32, ``[..., ceil(ceil(k/gran_k)/4)]``,
    padded with scales of 1."""
    check_tensor("x", x, dtype=_FLOATS)
    check_positive("gran_k", gran_k)
    if x.dim() < 1:
        raise ValueError("x must have at least one dimension")
    if use_packed_ue8m0 and not use_ue8m0:
        raise ValueError("use_packed_ue8m0 needs use_ue8m0=True (only UE8M0 scales pack)")
    if not use_ue8m0 and gran_k == GROUP:
        return fp8.per_token_cast_to_fp8(x)
    k = x.shape[-1]
    groups = _pad(x.float(), -1, gran_k).unflatten(-1, (-1, gran_k))
    scales = _scales(groups.abs().amax(dim=-1), use_ue8m0)
    x_fp8 = (groups * (1.0 / scales).unsqueeze(-1)).to(torch.float8_e4m3fn).flatten(-2)[..., :k].contiguous()
    if use_packed_ue8m0:
        scales = pack_ue8m0_to_int(torch.nn.functional.pad(scales, (0, -scales.shape[-1] % 4), value=1.0))
    return x_fp8, scales


def per_channel_cast_to_fp8(x: torch.Tensor, use_ue8m0: bool = False, gran_k: int = GROUP) -> tuple[torch.Tensor, torch.Tensor]:
    """x: [m, n] float -> (float8_e4m3fn [m, n], float32 scales [ceil(m/gran_k), n]):
    one scale per column per ``gran_k`` rows (how a K-major operand's transpose is
    scaled along K, as weight gradients need)."""
    check_tensor("x", x, dtype=_FLOATS, ndim=2)
    check_positive("gran_k", gran_k)
    m = x.shape[0]
    groups = _pad(x.float(), 0, gran_k).unflatten(0, (-1, gran_k))
    scales = _scales(groups.abs().amax(dim=1), use_ue8m0)
    return (groups * (1.0 / scales).unsqueeze(1)).to(torch.float8_e4m3fn).flatten(0, 1)[:m].contiguous(), scales


def per_block_cast_to_fp8(x: torch.Tensor, use_ue8m0: bool = False, gran_k: int = GROUP) -> tuple[torch.Tensor, torch.Tensor]:
    """x: [n, k] float -> (float8_e4m3fn [n, k], float32 scales [ceil(n/gran_k), ceil(k/gran_k)]):
    one scale per ``gran_k x gran_k`` block (weights)."""
    check_tensor("x", x, dtype=_FLOATS, ndim=2)
    check_positive("gran_k", gran_k)
    if not use_ue8m0 and gran_k == GROUP:
        return fp8.per_block_cast_to_fp8(x)
    n, k = x.shape
    blocks = _pad(_pad(x.float(), 0, gran_k), 1, gran_k).unflatten(0, (-1, gran_k)).unflatten(2, (-1, gran_k))
    scales = _scales(blocks.abs().amax(dim=(1, 3)), use_ue8m0)
    x_fp8 = (blocks * (1.0 / scales)[:, None, :, None]).to(torch.float8_e4m3fn).flatten(2).flatten(0, 1)
    return x_fp8[:n, :k].contiguous(), scales


def per_custom_dims_cast_to_fp8(x: torch.Tensor, dims: tuple[int, ...], use_ue8m0: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """x: float of any shape -> (float8_e4m3fn of its shape, float32 scales): one scale
    for each index along ``dims``, over all the other dimensions; the scales have
    the sizes of ``dims`` (size-1 dimensions squeezed, as DeepGEMM does). E.g.
    ``dims=(0,)`` on keys [n, d] scales each key by its own amax."""
    check_tensor("x", x, dtype=_FLOATS)
    kept = {d % x.dim() for d in dims} if x.dim() else set()
    reduced = tuple(d for d in range(x.dim()) if d not in kept)
    amax = x.abs().float().amax(dim=reduced, keepdim=True) if reduced else x.abs().float()
    scales = _scales(amax, use_ue8m0)
    return (x * (1.0 / scales)).to(torch.float8_e4m3fn), scales.squeeze()
