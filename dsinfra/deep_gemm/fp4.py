"""FP4 (E2M1) operands as DeepGEMM stores them: two 4-bit codes per int8 byte.

A code ``s eee`` holds a sign and one of the eight magnitudes
0, 0.5, 1, 1.5, 2, 3, 4, 6; element ``2i`` of a row sits in the low nibble of
byte ``i``, element ``2i + 1`` in the high nibble. Values are scaled per row in
groups of ``gran_k`` elements, ``x ≈ value * scale``, by float32 scales or by
UE8M0 ones packed four to an int32 (:mod:`dsinfra.deep_gemm.ue8m0`).

No device here has FP4 arithmetic: dsinfra decodes FP4 operands into bfloat16,
which holds every FP4 value times a power of two exactly, and computes on those.
"""

from __future__ import annotations

import torch

from dsinfra.deep_gemm.ue8m0 import ceil_to_ue8m0, pack_ue8m0_to_int, unpack_ue8m0_from_int
from dsinfra.deep_gemm.utils import align, ceil_div
from dsinfra.validation import check_positive, check_tensor

FP4_MAX = 6.0
_MAGNITUDES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
# a magnitude rounds to the code of the number of these midpoints it exceeds (ties toward zero)
_MIDPOINTS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)
_SIGN = 0x8
_AMAX_FLOOR = 1e-4


def _encode(x: torch.Tensor) -> torch.Tensor:
    """float32 values (already scaled into [-6, 6]) -> int8 codes ``s eee``, one per value."""
    midpoints = torch.tensor(_MIDPOINTS, dtype=torch.float32, device=x.device)
    codes = torch.bucketize(x.abs(), midpoints).to(torch.int8)
    return codes | ((x < 0) & (codes != 0)).to(torch.int8) * _SIGN


def fp4_to_float(packed: torch.Tensor) -> torch.Tensor:
    """packed: [..., n/2] torch.int8, two FP4 codes a byte -> [..., n] torch.float32, unscaled."""
    check_tensor("packed", packed, dtype=torch.int8)
    if packed.dim() == 0:
        raise ValueError("packed must have at least one dimension")
    codes = torch.stack((packed & 0xF, (packed >> 4) & 0xF), dim=-1).flatten(-2).to(torch.int64)
    magnitudes = torch.tensor(_MAGNITUDES, dtype=torch.float32, device=packed.device)[codes & 0x7]
    return torch.where(codes & _SIGN != 0, -magnitudes, magnitudes)


def _pack(codes: torch.Tensor) -> torch.Tensor:
    """int8 codes [..., n] (n even) -> [..., n/2] int8, element 2i in the low nibble."""
    pairs = codes.unflatten(-1, (-1, 2))
    return (pairs[..., 0] & 0xF) | (pairs[..., 1] << 4)


def per_token_cast_to_fp4(
    x: torch.Tensor, use_ue8m0: bool = False, gran_k: int = 128, use_packed_ue8m0: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """x: [m, n] float, n even -> (torch.int8 [m, n/2] FP4 codes, scales).

    Each row is scaled per ``gran_k`` elements by ``amax / 6`` (amax floored at
    1e-4), rounded up to a power of two with ``use_ue8m0``; values round to the
    nearest FP4 magnitude, ties toward zero. Scales: float32 ``[m, ceil(n/gran_k)]``,
    or with ``use_packed_ue8m0`` (needs ``use_ue8m0``) int32 ``[m, ceil(ceil(n/gran_k)/4)]``,
    padded with scales of 1 that cover no element.
    """
    check_tensor("x", x, dtype=(torch.float32, torch.bfloat16, torch.float16), ndim=2)
    check_positive("gran_k", gran_k)
    m, n = x.shape
    if n % 2:
        raise ValueError(f"x must have an even number of columns (two FP4 values a byte); got {n}")
    if use_packed_ue8m0 and not use_ue8m0:
        raise ValueError("use_packed_ue8m0 needs use_ue8m0=True (only UE8M0 scales pack)")
    padded = torch.nn.functional.pad(x.float(), (0, align(n, gran_k) - n)).view(m, -1, gran_k)
    scales = padded.abs().amax(dim=2).clamp(min=_AMAX_FLOOR) / FP4_MAX
    if use_ue8m0:
        scales = ceil_to_ue8m0(scales)
    codes = _encode(padded * (1.0 / scales).unsqueeze(2)).view(m, -1)
    packed = _pack(codes)[:, : n // 2].contiguous()
    if use_packed_ue8m0:
        scales = torch.nn.functional.pad(scales, (0, -scales.shape[1] % 4), value=1.0)
        return packed, pack_ue8m0_to_int(scales)
    return packed, scales


def cast_back_from_fp4(
    packed: torch.Tensor, sf: torch.Tensor, gran_k: int = 128, use_packed_ue8m0: bool = False
) -> torch.Tensor:
    """The inverse of :func:`per_token_cast_to_fp4`: packed [..., n/2] torch.int8 and
    scales [..., ceil(n/gran_k)] float32 (or int32 packed UE8M0 with
    ``use_packed_ue8m0``) -> [..., n] torch.float32, exactly ``value * scale``."""
    values = fp4_to_float(packed)
    check_positive("gran_k", gran_k)
    n = values.shape[-1]
    if use_packed_ue8m0:
        check_tensor("sf", sf, dtype=torch.int32, ndim=packed.dim())
        sf = unpack_ue8m0_from_int(sf)
    else:
        check_tensor("sf", sf, dtype=torch.float32, ndim=packed.dim())
    groups = ceil_div(n, gran_k)
    if sf.shape[:-1] != packed.shape[:-1] or sf.shape[-1] < groups:
        expected = [*packed.shape[:-1], groups]
        raise ValueError(f"sf must hold {expected} scales (gran_k={gran_k}); got shape {list(sf.shape)}")
    return values * sf[..., :groups].repeat_interleave(gran_k, dim=-1)[..., :n]


def transpose_packed_fp4(a: torch.Tensor) -> torch.Tensor:
    """a: [m, n/2] torch.int8 FP4 codes of an [m, n] matrix, m even -> [n, m/2], the
    codes of its transpose, packed the same way."""
    check_tensor("a", a, dtype=torch.int8, ndim=2)
    if a.shape[0] % 2:
        raise ValueError(f"a must have an even number of rows (they pack in pairs once transposed); got {a.shape[0]}")
    codes = torch.stack((a & 0xF, (a >> 4) & 0xF), dim=-1).flatten(-2)
    return _pack(codes.T).contiguous()
