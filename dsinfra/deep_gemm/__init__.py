"""FP8 GEMMs with fine-grained scaling: DeepGEMM's API, in portable Python.

``from dsinfra import deep_gemm`` stands in for ``import deep_gemm``. Operands are
pairs ``(x, scales)``: ``x`` is ``float8_e4m3fn`` (or FP4) and ``x ≈ x.float() * scale``
per group of 128 along K (1x128, "per token", for the LHS; 128x128 blocks, or 1x128,
for the RHS) or as a recipe says; :func:`per_token_cast_to_fp8` and
:func:`per_block_cast_to_fp8` make them. Outputs are written into the ``out`` /
``d`` tensor given.

Names of DeepGEMM's February 2025 release (``gemm_fp8_fp8_bf16_nt``,
``m_grouped_gemm_fp8_fp8_bf16_nt_contiguous``, ``..._masked``) and of its later
releases (``fp8_gemm_{nt,nn,tn,tt}``, ``fp8_fp4_gemm_*``, ``m_grouped_fp8_gemm_*``,
``k_grouped_fp8_gemm_*``, ``bf16_gemm_*``, the indexer's ``fp8_mqa_logits``, ...)
all work: :mod:`.gemm` and :mod:`.bf16` transform their layouts onto the
implementations, :mod:`.mqa_logits` holds the indexer's scores.

Each function checks its arguments (TypeError/ValueError naming the argument),
then :func:`dsinfra.backend.choose` picks the implementation: ``reference``
(dequantise, float32 matmul), ``torch`` (the CPU path) or ``triton`` (the GPU
path). Shapes need not be multiples of 128; K need not be a multiple of 16 either
(DeepGEMM needs it, for TMA); scales may come row- or column-major.
"""

from __future__ import annotations

import torch

from dsinfra.deep_gemm import testing, utils
from dsinfra.deep_gemm.testing import bench, bench_kineto
from dsinfra.deep_gemm.bf16 import (
    bf16_gemm_nn,
    bf16_gemm_nt,
    bf16_gemm_tn,
    bf16_gemm_tt,
    cublaslt_gemm_nn,
    cublaslt_gemm_nt,
    cublaslt_gemm_tn,
    cublaslt_gemm_tt,
    k_grouped_bf16_gemm_tn_contiguous,
    m_grouped_bf16_gemm_nn_contiguous,
    m_grouped_bf16_gemm_nt_contiguous,
    m_grouped_bf16_gemm_nt_masked,
)
from dsinfra.deep_gemm.gemm import (
    fp8_fp4_gemm_nn,
    fp8_fp4_gemm_nt,
    fp8_fp4_gemm_tn,
    fp8_fp4_gemm_tt,
    fp8_gemm_nt_skip_head_mid,
    k_grouped_fp8_gemm_nt_contiguous,
    k_grouped_fp8_gemm_tn_contiguous,
    m_grouped_fp8_fp4_gemm_nn_contiguous,
    m_grouped_fp8_fp4_gemm_nt_contiguous,
    m_grouped_fp8_fp4_gemm_nt_masked,
)
from dsinfra.deep_gemm.hyperconnection import tf32_hc_prenorm_gemm
from dsinfra.deep_gemm.mqa_logits import (
    fp8_fp4_mqa_logits,
    fp8_fp4_paged_mqa_logits,
    fp8_mqa_logits,
    fp8_paged_mqa_logits,
    get_paged_mqa_logits_metadata,
)
from dsinfra.deep_gemm.einsum import einsum, fp8_einsum
from dsinfra.deep_gemm.gemm import dense as _dense
from dsinfra.deep_gemm.gemm import m_grouped_contiguous as _m_grouped_contiguous
from dsinfra.deep_gemm.gemm import m_grouped_masked as _m_grouped_masked
from dsinfra.deep_gemm.operands import operand as _operand
from dsinfra.deep_gemm.utils import (
    align,
    cast_back_from_fp4,
    ceil_div,
    ceil_to_ue8m0,
    get_col_major_tma_aligned_tensor,
    get_k_alignment_for_contiguous_layout,
    get_k_grouped_mn_major_tma_aligned_packed_ue8m0_tensor,
    get_m_alignment_for_contiguous_layout,
    get_mk_alignment_for_contiguous_layout,
    get_mn_major_tma_aligned_packed_ue8m0_tensor,
    get_mn_major_tma_aligned_tensor,
    get_num_sms,
    get_pdl,
    get_tc_util,
    get_theoretical_mk_alignment_for_contiguous_layout,
    get_tma_aligned_size,
    pack_ue8m0_to_int,
    per_block_cast_to_fp8,
    per_channel_cast_to_fp8,
    per_custom_dims_cast_to_fp8,
    per_token_cast_to_fp4,
    per_token_cast_to_fp8,
    set_block_size_multiple_of,
    set_ignore_compile_dims,
    set_mk_alignment_for_contiguous_layout,
    set_num_sms,
    set_pdl,
    set_tc_util,
    transform_sf_into_required_layout,
    transpose_packed_fp4,
    unpack_ue8m0_from_int,
)
from dsinfra.fp8 import GROUP, per_block_cast_back, per_token_cast_back
from dsinfra.testing import calc_diff
from dsinfra.validation import check_tensor

OPERATIONS = (
    "fp8_gemm_nt",
    "m_grouped_fp8_gemm_nt_contiguous",
    "m_grouped_fp8_gemm_nt_masked",
    "k_grouped_fp8_gemm_tn_contiguous",
    "bf16_gemm_nt",
    "fp8_mqa_logits",
    "fp8_paged_mqa_logits",
)

_BLOCKS = (1, GROUP)  # the February 2025 release's recipe: 1x128 LHS, 128x128 RHS
_BLOCK_RHS = (GROUP, GROUP)


def gemm_fp8_fp8_bf16_nt(lhs: tuple[torch.Tensor, torch.Tensor], rhs: tuple[torch.Tensor, torch.Tensor], out: torch.Tensor) -> None:
    """out = lhs @ rhs.T: DeepGEMM's normal GEMM (its February 2025 name).

    lhs: (``[m, k]`` float8_e4m3fn, ``[m, ceil(k/128)]`` float32 1x128 scales).
    rhs: (``[n, k]`` float8_e4m3fn, ``[ceil(n/128), ceil(k/128)]`` float32 128x128 scales).
    out: ``[m, n]`` torch.bfloat16; written.
    """
    check_tensor("out", out, dtype=torch.bfloat16)
    _dense(_operand("lhs", lhs, _BLOCKS, weight=False), _operand("rhs", rhs, _BLOCK_RHS, weight=True), out, None, ("lhs", "rhs", "out"))


def m_grouped_gemm_fp8_fp8_bf16_nt_contiguous(lhs, rhs, out: torch.Tensor, m_indices: torch.Tensor) -> None:
    """out[i] = lhs[i] @ rhs[m_indices[i]].T: the MoE grouped GEMM, contiguous layout
    (the February 2025 name of :func:`m_grouped_fp8_fp4_gemm_nt_contiguous`).

    lhs: (``[m_sum, k]`` float8_e4m3fn, ``[m_sum, ceil(k/128)]`` float32): every group's
        rows back to back, each group's segment aligned to
        :func:`get_mk_alignment_for_contiguous_layout` (128) rows.
    rhs: (``[num_groups, n, k]`` float8_e4m3fn, ``[num_groups, ceil(n/128), ceil(k/128)]`` float32).
    out: ``[m_sum, n]`` torch.bfloat16; rows whose m_indices is -1 are written as zeros.
    m_indices: ``[m_sum]`` torch.int32, contiguous: each row's group, or -1 for a padding row.
    """
    names = ("lhs", "rhs", "out", "m_indices")
    x, y = _operand("lhs", lhs, _BLOCKS, weight=False), _operand("rhs", rhs, _BLOCK_RHS, weight=True)
    _m_grouped_contiguous(x, y, out, m_indices, False, True, names)


def m_grouped_gemm_fp8_fp8_bf16_nt_masked(lhs, rhs, out: torch.Tensor, masked_m: torch.Tensor, expected_m: int) -> None:
    """out[g, :masked_m[g]] = lhs[g, :masked_m[g]] @ rhs[g].T: the MoE grouped GEMM,
    masked layout (the February 2025 name of :func:`m_grouped_fp8_fp4_gemm_nt_masked`).

    lhs: (``[num_groups, m_max, k]`` float8_e4m3fn, ``[num_groups, m_max, ceil(k/128)]`` float32).
    rhs: (``[num_groups, n, k]`` float8_e4m3fn, ``[num_groups, ceil(n/128), ceil(k/128)]`` float32).
    out: ``[num_groups, m_max, n]`` torch.bfloat16; rows past masked_m[g] are left untouched.
    masked_m: ``[num_groups]`` torch.int32, contiguous, each in [0, m_max]; may stay on the GPU.
    expected_m: a hint for the typical masked_m, > 0 (picks the GPU tile size).
    """
    x, y = _operand("lhs", lhs, _BLOCKS, weight=False), _operand("rhs", rhs, _BLOCK_RHS, weight=True)
    _m_grouped_masked(x, y, out, masked_m, expected_m, ("lhs", "rhs", "out"))


# The FP8 linear layer and the legacy kernels use the GEMMs above, hence imported last.
from dsinfra.deep_gemm import legacy  # noqa: E402
from dsinfra.deep_gemm.linear import FP8Linear, FP8LinearFunction  # noqa: E402

# DeepGEMM's other names for the same operations.
fp8_gemm_nt, fp8_gemm_nn, fp8_gemm_tn, fp8_gemm_tt = fp8_fp4_gemm_nt, fp8_fp4_gemm_nn, fp8_fp4_gemm_tn, fp8_fp4_gemm_tt
m_grouped_fp8_gemm_nt_contiguous = m_grouped_fp8_fp4_gemm_nt_contiguous
m_grouped_fp8_gemm_nn_contiguous = m_grouped_fp8_fp4_gemm_nn_contiguous
m_grouped_fp8_gemm_nt_masked = fp8_m_grouped_gemm_nt_masked = m_grouped_fp8_fp4_gemm_nt_masked
bf16_m_grouped_gemm_nt_masked = m_grouped_bf16_gemm_nt_masked

_NOT_PROVIDED = ("SymmBuffer", "get_symm_buffer_for_mega_moe", "transform_weights_for_mega_moe", "fp8_fp4_mega_moe", "bf16_mega_moe")


def __getattr__(name: str):
    if name in _NOT_PROVIDED:
        raise AttributeError(
            f"dsinfra.deep_gemm does not provide {name}: DeepGEMM's Mega MoE fuses expert-parallel dispatch, "
            "both MoE GEMMs and combine over NVLink symmetric memory; use dsinfra.deep_ep with the grouped GEMMs"
        )
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "FP8Linear",
    "FP8LinearFunction",
    "OPERATIONS",
    "align",
    "bench",
    "bench_kineto",
    "bf16_gemm_nn",
    "bf16_gemm_nt",
    "bf16_gemm_tn",
    "bf16_gemm_tt",
    "bf16_m_grouped_gemm_nt_masked",
    "calc_diff",
    "cast_back_from_fp4",
    "ceil_div",
    "ceil_to_ue8m0",
    "cublaslt_gemm_nn",
    "cublaslt_gemm_nt",
    "cublaslt_gemm_tn",
    "cublaslt_gemm_tt",
    "einsum",
    "fp8_einsum",
    "fp8_fp4_gemm_nn",
    "fp8_fp4_gemm_nt",
    "fp8_fp4_gemm_tn",
    "fp8_fp4_gemm_tt",
    "fp8_fp4_mqa_logits",
    "fp8_fp4_paged_mqa_logits",
    "fp8_gemm_nn",
    "fp8_gemm_nt",
    "fp8_gemm_nt_skip_head_mid",
    "fp8_gemm_tn",
    "fp8_gemm_tt",
    "fp8_m_grouped_gemm_nt_masked",
    "fp8_mqa_logits",
    "fp8_paged_mqa_logits",
    "gemm_fp8_fp8_bf16_nt",
    "get_col_major_tma_aligned_tensor",
    "get_k_alignment_for_contiguous_layout",
    "get_k_grouped_mn_major_tma_aligned_packed_ue8m0_tensor",
    "get_m_alignment_for_contiguous_layout",
    "get_mk_alignment_for_contiguous_layout",
    "get_mn_major_tma_aligned_packed_ue8m0_tensor",
    "get_mn_major_tma_aligned_tensor",
    "get_num_sms",
    "get_paged_mqa_logits_metadata",
    "get_pdl",
    "get_tc_util",
    "get_theoretical_mk_alignment_for_contiguous_layout",
    "get_tma_aligned_size",
    "k_grouped_bf16_gemm_tn_contiguous",
    "k_grouped_fp8_gemm_nt_contiguous",
    "k_grouped_fp8_gemm_tn_contiguous",
    "legacy",
    "m_grouped_bf16_gemm_nn_contiguous",
    "m_grouped_bf16_gemm_nt_contiguous",
    "m_grouped_bf16_gemm_nt_masked",
    "m_grouped_fp8_fp4_gemm_nn_contiguous",
    "m_grouped_fp8_fp4_gemm_nt_contiguous",
    "m_grouped_fp8_fp4_gemm_nt_masked",
    "m_grouped_fp8_gemm_nn_contiguous",
    "m_grouped_fp8_gemm_nt_contiguous",
    "m_grouped_fp8_gemm_nt_masked",
    "m_grouped_gemm_fp8_fp8_bf16_nt_contiguous",
    "m_grouped_gemm_fp8_fp8_bf16_nt_masked",
    "pack_ue8m0_to_int",
    "per_block_cast_back",
    "per_block_cast_to_fp8",
    "per_channel_cast_to_fp8",
    "per_custom_dims_cast_to_fp8",
    "per_token_cast_back",
    "per_token_cast_to_fp4",
    "per_token_cast_to_fp8",
    "set_block_size_multiple_of",
    "set_ignore_compile_dims",
    "set_mk_alignment_for_contiguous_layout",
    "set_num_sms",
    "set_pdl",
    "set_tc_util",
    "testing",
    "tf32_hc_prenorm_gemm",
    "transform_sf_into_required_layout",
    "transpose_packed_fp4",
    "unpack_ue8m0_from_int",
    "utils",
]
