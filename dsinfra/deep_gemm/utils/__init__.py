"""Utilities under DeepGEMM's names (``deep_gemm.utils``, with its ``math`` and
``layout`` modules): integer helpers, the SM count kernels may use, the
contiguous layout's alignment, runtime settings, the TMA-aligned scale layouts,
and (imported last) the casts and scale formats.

Scale layouts. An LHS scaling tensor ``[m, ceil(k/128)]`` may come row-major
(as :func:`dsinfra.fp8.per_token_cast_to_fp8` returns it) or column-major with
``m`` padded to 16 bytes (as :func:`get_col_major_tma_aligned_tensor` makes it,
the layout DeepGEMM's TMA loads need). Every implementation here reads scales
through their strides, so both serve; the column-major form costs nothing extra.
"""

from __future__ import annotations

import torch

from dsinfra import backend
from dsinfra.fp8 import GROUP
from dsinfra.validation import check_positive, check_tensor

_TMA_ALIGNMENT_BYTES = 16
_num_sms: int | None = None
_MIN_MK_ALIGNMENT = 16
_mk_alignment = GROUP
_tc_util = 100
_pdl = False


def ceil_div(x: int, y: int) -> int:
    """Ceiling division of two integers."""
    return (x + y - 1) // y


def align(x: int, y: int) -> int:
    """``x`` rounded up to a multiple of ``y``."""
    return ceil_div(x, y) * y


def _default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def set_num_sms(num_sms: int) -> None:
    """Cap the number of SMs (persistent Triton programs) the GEMM kernels use.

    num_sms: at least 1 and at most what the default device has
        (:func:`dsinfra.backend.num_parallel_units`: SMs on a GPU, threads on the CPU).
    """
    global _num_sms
    available = backend.num_parallel_units(_default_device())
    check_positive("num_sms", num_sms)
    if num_sms > available:
        raise ValueError(f"num_sms must be <= {available} (what {_default_device()} has); got {num_sms}")
    _num_sms = num_sms


def get_num_sms() -> int:
    """The SM cap set by :func:`set_num_sms`, by default all the default device has."""
    return _num_sms if _num_sms is not None else backend.num_parallel_units(_default_device())


def set_tc_util(tc_util: int) -> None:
    """DeepGEMM's estimate of the tensor-core utilisation (a percentage, 1..100) its
    heuristics plan with: kept for :func:`get_tc_util`, of no effect here."""
    global _tc_util
    check_positive("tc_util", tc_util)
    if tc_util > 100:
        raise ValueError(f"tc_util must be a percentage in [1, 100]; got {tc_util}")
    _tc_util = tc_util


def get_tc_util() -> int:
    """The value of :func:`set_tc_util` (100 by default)."""
    return _tc_util


def set_pdl(enable_pdl: bool) -> None:
    """Whether DeepGEMM's kernels use programmatic dependent launch (a Hopper launch
    option): kept for :func:`get_pdl`, of no effect here."""
    global _pdl
    if not isinstance(enable_pdl, bool):
        raise TypeError(f"enable_pdl must be a bool; got {type(enable_pdl).__name__}")
    _pdl = enable_pdl


def get_pdl() -> bool:
    """The value of :func:`set_pdl` (False by default)."""
    return _pdl


def set_ignore_compile_dims(value: bool) -> None:
    """DeepGEMM's switch to compile kernels without the shapes baked in; of no effect
    here (Triton specialises as it does)."""
    if not isinstance(value, bool):
        raise TypeError(f"value must be a bool; got {type(value).__name__}")


def set_block_size_multiple_of(value: int | tuple[int, int]) -> None:
    """DeepGEMM's constraint on its block sizes (one int, or one for M and one for N);
    checked, of no effect here."""
    for entry in value if isinstance(value, (tuple, list)) else (value,):
        check_positive("value", entry)


def set_mk_alignment_for_contiguous_layout(alignment: int) -> None:
    """Set the row alignment of each group's segment in the contiguous grouped
    layouts (M-grouped: rows of ``a``; K-grouped: rows of ``a`` and ``b``), a
    positive multiple of 16 (DeepGEMM's kernels take 128, or multiples of 32 on
    SM100). Every implementation here serves any such alignment."""
    global _mk_alignment
    check_positive("alignment", alignment)
    if alignment % _MIN_MK_ALIGNMENT:
        raise ValueError(f"alignment must be a multiple of {_MIN_MK_ALIGNMENT}; got {alignment}")
    _mk_alignment = alignment


def get_mk_alignment_for_contiguous_layout() -> int:
    """Row alignment of each group's segment in the contiguous grouped layouts: 128
    unless :func:`set_mk_alignment_for_contiguous_layout` changed it.

    Every aligned block of that many rows of ``lhs`` belongs to one group (rows
    marked -1 aside), so a tile of rows multiplies one ``rhs`` matrix.
    """
    return _mk_alignment


def get_theoretical_mk_alignment_for_contiguous_layout(expected_m: int | None = None) -> int:
    """The alignment DeepGEMM's kernels would pick for groups of about ``expected_m``
    rows: 128 (its choice off SM100 GPUs, which dsinfra follows)."""
    if expected_m is not None:
        check_positive("expected_m", expected_m, allow_zero=True)
    return GROUP


get_m_alignment_for_contiguous_layout = get_mk_alignment_for_contiguous_layout
get_k_alignment_for_contiguous_layout = get_mk_alignment_for_contiguous_layout


def get_tma_aligned_size(x: int, element_size: int) -> int:
    """``x`` elements of ``element_size`` bytes, rounded up to a multiple of 16 bytes
    (TMA's global-memory alignment): the padded M of a column-major scale tensor."""
    check_positive("x", x, allow_zero=True)
    check_positive("element_size", element_size)
    if _TMA_ALIGNMENT_BYTES % element_size:
        raise ValueError(f"element_size must divide {_TMA_ALIGNMENT_BYTES}; got {element_size}")
    return align(x, _TMA_ALIGNMENT_BYTES // element_size)


def get_mn_major_tma_aligned_tensor(x: torch.Tensor) -> torch.Tensor:
    """x: [m, k] or [num_groups, m, k] scales -> the same values, column-major, with
    ``m`` padded to 16 bytes (strides ``(1, aligned_m)``, or
    ``(aligned_m * k, 1, aligned_m)`` for 3-D). Returned as is if already so."""
    check_tensor("x", x)
    if x.dim() not in (2, 3):
        raise ValueError(f"x must have 2 or 3 dimensions; got shape {list(x.shape)}")
    batched = x if x.dim() == 3 else x.unsqueeze(0)
    groups, m, k = batched.shape
    aligned_m = get_tma_aligned_size(m, x.element_size())
    if batched.stride(1) == 1 and batched.stride(2) == aligned_m and (groups == 1 or batched.stride(0) == aligned_m * k):
        return x
    aligned = torch.empty(groups, k, aligned_m, dtype=x.dtype, device=x.device).transpose(1, 2)[:, :m]
    aligned.copy_(batched)
    return aligned if x.dim() == 3 else aligned.squeeze(0)


get_col_major_tma_aligned_tensor = get_mn_major_tma_aligned_tensor  # its February 2025 name


def rhs_rows_per_scale(rhs_scales: torch.Tensor, n: int) -> int:
    """How many rows of an ``[n, k]`` RHS share a scale row: 128 for 128x128 block
    scales ``[ceil(n/128), ...]``, 1 for 1x128 scales ``[n, ...]`` (n = 1 reads alike)."""
    return 1 if rhs_scales.shape[-2] == n else GROUP


# DeepGEMM's deep_gemm.utils also holds its casts and scale formats (they use the helpers above).
from dsinfra.deep_gemm.casts import (  # noqa: E402,F401
    per_block_cast_to_fp8,
    per_channel_cast_to_fp8,
    per_custom_dims_cast_to_fp8,
    per_token_cast_to_fp8,
)
from dsinfra.deep_gemm.fp4 import cast_back_from_fp4, per_token_cast_to_fp4, transpose_packed_fp4  # noqa: E402,F401
from dsinfra.deep_gemm.sf_layout import (  # noqa: E402,F401
    get_k_grouped_mn_major_tma_aligned_packed_ue8m0_tensor,
    get_mn_major_tma_aligned_packed_ue8m0_tensor,
    transform_sf_into_required_layout,
)
from dsinfra.deep_gemm.ue8m0 import ceil_to_ue8m0, pack_ue8m0_to_int, unpack_ue8m0_from_int  # noqa: E402,F401
