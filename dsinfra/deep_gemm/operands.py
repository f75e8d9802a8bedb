"""GEMM operands as DeepGEMM's current API takes them, turned into what the
implementations compute on.

An operand is a pair ``(values, scales)``:

- values: float8_e4m3fn ``[..., rows, k]``, any strides (K-major or MN-major), or
  FP4 (torch.int8, two E2M1 codes a byte, :mod:`dsinfra.deep_gemm.fp4`) packed
  along its contiguous dimension: ``[..., rows, k / 2]`` K-major or
  ``[..., rows / 2, k]`` MN-major;
- scales: float32 ``[..., ceil(rows / gran_mn), ceil(k / gran_k)]``, or the same as
  UE8M0 bytes packed four to an int32 along k (``[..., ceil(rows / gran_mn),
  ceil(ceil(k / gran_k) / 4)]``), unpacked here exactly.

The granularity ``(gran_mn, gran_k)`` comes from the caller's recipe, or by
default (1, 128), or (128, 128) for a weight whose float32 scales have one row per
128 rows. FP8 operands with ``gran_k = 128`` and one scale per row (or per 128-row
block of a weight) are what the FP8 kernels take (:class:`Operand` with scales);
every other operand (FP4, other granularities) is dequantised into float32,
exactly up to float32's rounding of ``value * scale``, and computed on as such.
"""

from __future__ import annotations

import dataclasses

import torch

from dsinfra.deep_gemm.fp4 import fp4_to_float
from dsinfra.deep_gemm.ue8m0 import unpack_ue8m0_from_int
from dsinfra.deep_gemm.utils import ceil_div
from dsinfra.fp8 import GROUP, fp8_to_float
from dsinfra.validation import check_positive, check_tensor


@dataclasses.dataclass
class Operand:
    """values: float8_e4m3fn ``[..., rows, k]`` with float32 ``scales`` (one per row, or
    per 128-row block, per 128 of k); or float32 ``[..., rows, k]`` already scaled
    (``scales`` None)."""

    values: torch.Tensor
    scales: torch.Tensor | None

    @property
    def native(self) -> bool:
        return self.scales is not None

    def transposed(self) -> Operand:
        """The operand of the transposed matrix (last two dimensions swapped)."""
        return Operand(self.values.transpose(-1, -2), None if self.scales is None else self.scales.transpose(-1, -2))


def pair(name: str, value: object) -> tuple:
    """Check that ``value`` is a pair (values, scales) and return it as a tuple."""
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise TypeError(f"{name} must be a pair (values, scales); got {type(value).__name__}")
    return tuple(value)


def transposed_pair(name: str, value: object) -> tuple:
    """The pair of the transposed matrix: values and scales with their last two dimensions swapped."""
    values, scales = pair(name, value)
    check_tensor(f"{name}[0]", values)
    check_tensor(f"{name}[1]", scales)
    return values.transpose(-1, -2), scales.transpose(-1, -2)


def check_granularity(name: str, granularity: object, length: int) -> tuple[int, ...]:
    """Check a recipe: a tuple of ``length`` positive ints."""
    if not isinstance(granularity, (tuple, list)) or len(granularity) != length:
        raise TypeError(f"{name} must be a tuple of {length} ints; got {granularity!r}")
    for value in granularity:
        check_positive(f"{name} entries", value)
    return tuple(granularity)


def _logical_values(name: str, values: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """(values as [..., rows, k] float8_e4m3fn or float32 unscaled FP4, whether FP4)."""
    check_tensor(f"{name}[0]", values, dtype=(torch.float8_e4m3fn, torch.int8))
    if values.dim() < 2:
        raise ValueError(f"{name}[0] must have at least 2 dimensions; got shape {list(values.shape)}")
    if values.dtype == torch.float8_e4m3fn:
        return values, False
    if values.stride(-1) == 1 or values.shape[-1] == 1:
        return fp4_to_float(values), True
    return fp4_to_float(values.transpose(-1, -2)).transpose(-1, -2), True  # MN-major: packed along rows


def _float_scales(name: str, scales: torch.Tensor, rows: int, k: int, granularity: tuple[int, int]) -> torch.Tensor:
    """float32 scales [..., ceil(rows/gran_mn), ceil(k/gran_k)], unpacked from UE8M0 int32s if need be."""
    gran_mn, gran_k = granularity
    shape = (ceil_div(rows, gran_mn), ceil_div(k, gran_k))
    check_tensor(f"{name}[1]", scales, dtype=(torch.float32, torch.int32))
    if scales.dtype == torch.int32:
        packed = (*scales.shape[:-2], shape[0], ceil_div(shape[1], 4))
        check_tensor(f"{name}[1]", scales, shape=packed)
        return unpack_ue8m0_from_int(scales)[..., : shape[1]]
    check_tensor(f"{name}[1]", scales, shape=(*scales.shape[:-2], *shape))
    return scales


def _default_granularity(scales: torch.Tensor, rows: int, weight: bool) -> tuple[int, int]:
    """(1, 128), or (128, 128) for a weight with float32 scales of one row per 128 rows."""
    if weight and scales.dtype == torch.float32 and scales.dim() >= 2 and scales.shape[-2] != rows:
        return (GROUP, GROUP)
    return (1, GROUP)


def _expand(scales: torch.Tensor, rows: int, k: int, gran_mn: int, gran_k: int) -> torch.Tensor:
    """scales [..., ceil(rows/gran_mn), ceil(k/gran_k)] -> one per element [..., rows, k]."""
    per_row = scales.repeat_interleave(gran_mn, dim=-2)[..., :rows, :]
    return per_row.repeat_interleave(gran_k, dim=-1)[..., :k]


def operand(name: str, value: object, granularity: tuple[int, int] | None, weight: bool) -> Operand:
    """Check ``value`` = (values, scales) and return it as an :class:`Operand`.

    granularity: (gran_mn, gran_k), or None for the default. weight: whether
    128x128 block scales may stay as they are (the FP8 kernels take them for
    the right-hand operand only).
    """
    values, scales = pair(name, value)
    values, fp4 = _logical_values(name, values)
    check_tensor(f"{name}[1]", scales, device=values.device)
    rows, k = values.shape[-2:]
    if granularity is None:
        granularity = _default_granularity(scales, rows, weight)
    gran_mn, gran_k = granularity
    scales = _float_scales(name, scales, rows, k, granularity)
    if scales.dim() != values.dim() or scales.shape[:-2] != values.shape[:-2]:
        raise ValueError(f"{name}[1] must have {values.dim()} dimensions, the leading ones {list(values.shape[:-2])}; got shape {list(scales.shape)}")
    if not fp4 and gran_k == GROUP:
        if gran_mn == 1 or (weight and gran_mn == GROUP):
            return Operand(values, scales)
        return Operand(values, scales.repeat_interleave(gran_mn, dim=-2)[..., :rows, :])
    floats = values if fp4 else fp8_to_float(values)
    return Operand(floats * _expand(scales, rows, k, gran_mn, gran_k), None)


def dequantised(x: Operand) -> torch.Tensor:
    """The operand's values times its scales, float32 ``[..., rows, k]``."""
    if not x.native:
        return x.values
    rows, k = x.values.shape[-2:]
    gran_mn = 1 if x.scales.shape[-2] == rows else GROUP
    return fp8_to_float(x.values) * _expand(x.scales, rows, k, gran_mn, GROUP)
