"""FP8 GEMMs with fine-grained scaling: DeepGEMM's API, in portable Python.

``from dsinfra import deep_gemm`` stands in for ``import deep_gemm``. Operands are
pairs ``(x, scales)``: ``x`` is ``float8_e4m3fn`` and ``x ≈ x.float() * scale`` per
group of 128 along K (1x128, "per token", for the LHS; 128x128 blocks, or 1x128,
for the RHS); :func:`per_token_cast_to_fp8` and :func:`per_block_cast_to_fp8` make
them. Outputs are written into the ``out`` / ``d`` tensor given.

Names of DeepGEMM's February 2025 release (``gemm_fp8_fp8_bf16_nt``,
``m_grouped_gemm_fp8_fp8_bf16_nt_contiguous``, ``..._masked``) and of its later
releases (``fp8_gemm_nt``, ``m_grouped_fp8_gemm_nt_contiguous``,
``m_grouped_fp8_gemm_nt_masked``, ``k_grouped_fp8_gemm_tn_contiguous``) both work.

Each function checks its arguments (TypeError/ValueError naming the argument),
then :func:`dsinfra.backend.choose` picks the implementation: ``reference``
(dequantise, float32 matmul), ``torch`` (the CPU path) or ``triton`` (the GPU
path). Shapes need not be multiples of 128; K need not be a multiple of 16 either
(DeepGEMM needs it, for TMA); scales may come row- or column-major.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from dsinfra import backend
from dsinfra.deep_gemm.utils import (
    align,
    cast_back_from_fp4,
    ceil_div,
    ceil_to_ue8m0,
    get_col_major_tma_aligned_tensor,
    get_k_alignment_for_contiguous_layout,
    get_m_alignment_for_contiguous_layout,
    get_mk_alignment_for_contiguous_layout,
    get_num_sms,
    get_theoretical_mk_alignment_for_contiguous_layout,
    get_tma_aligned_size,
    pack_ue8m0_to_int,
    per_block_cast_to_fp8,
    per_channel_cast_to_fp8,
    per_custom_dims_cast_to_fp8,
    per_token_cast_to_fp4,
    per_token_cast_to_fp8,
    set_mk_alignment_for_contiguous_layout,
    set_num_sms,
    transpose_packed_fp4,
    unpack_ue8m0_from_int,
)
from dsinfra.fp8 import GROUP, per_block_cast_back, per_token_cast_back
from dsinfra.testing import calc_diff
from dsinfra.validation import check_positive, check_range, check_tensor

OPERATIONS = (
    "fp8_gemm_nt",
    "m_grouped_fp8_gemm_nt_contiguous",
    "m_grouped_fp8_gemm_nt_masked",
    "k_grouped_fp8_gemm_tn_contiguous",
    "fp8_mqa_logits",
    "fp8_paged_mqa_logits",
)

RECIPES = ((1, GROUP, GROUP), (1, 1, GROUP))  # (LHS rows, RHS rows, K) per scale


def _operand(name: str, operand: object, shape: tuple, device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Check that ``operand`` is a pair (float8_e4m3fn tensor of ``shape``, float32
    scales) and return it; the scales' shape is checked by the caller."""
    if not isinstance(operand, (tuple, list)) or len(operand) != 2:
        raise TypeError(f"{name} must be a pair (float8_e4m3fn tensor, float32 scales); got {type(operand).__name__}")
    x, scales = operand
    check_tensor(f"{name}[0]", x, dtype=torch.float8_e4m3fn, shape=shape, device=device)
    check_tensor(f"{name}[1]", scales, dtype=torch.float32, device=x.device)
    return x, scales


def _implementation(operation: str, device: torch.device):
    return backend.load(__name__, backend.choose(operation, device))


def _check_sizes(name: str, **sizes: int) -> None:
    """Check that every named dimension of the tensor ``name`` is at least 1."""
    for dimension, size in sizes.items():
        check_positive(f"{dimension} ({name} dimension)", size)


def _dense_gemm(a, b, d, c, recipe, names: tuple[str, str, str]) -> None:
    """Check a dense GEMM's arguments (called ``names`` by the caller) and run it."""
    a_name, b_name, d_name = names
    x, sa = _operand(a_name, a, ("m", "k"))
    m, k = x.shape
    y, sb = _operand(b_name, b, ("n", k), x.device)
    n = y.shape[0]
    _check_sizes(f"{b_name}[0]", n=n, k=k)
    check_tensor(f"{a_name}[1]", sa, shape=(m, ceil_div(k, GROUP)))
    if recipe is None:
        rhs_rows = 1 if sb.dim() == 2 and sb.shape[0] == n else GROUP
    elif tuple(recipe) in RECIPES:
        rhs_rows = recipe[1]
    else:
        raise ValueError(f"recipe must be one of {', '.join(map(str, RECIPES))}; got {recipe}")
    check_tensor(f"{b_name}[1]", sb, shape=(ceil_div(n, rhs_rows), ceil_div(k, GROUP)))
    check_tensor(d_name, d, dtype=(torch.bfloat16, torch.float32), shape=(m, n), device=x.device)
    if c is not None:
        check_tensor("c", c, dtype=torch.float32, shape=(m, n), device=x.device)
        if d.dtype != torch.float32:
            raise TypeError(f"{d_name} must have dtype float32 when c is given; got {str(d.dtype).replace('torch.', '')}")
    _implementation("fp8_gemm_nt", x.device).fp8_gemm_nt(x, sa, y, sb, d, c)


def fp8_gemm_nt(
    a: tuple[torch.Tensor, torch.Tensor],
    b: tuple[torch.Tensor, torch.Tensor],
    d: torch.Tensor,
    c: torch.Tensor | None = None,
    recipe: tuple[int, int, int] | None = None,
) -> None:
    """d = c + a @ b.T with FP8 operands and fine-grained scaling.

    a: (``[m, k]`` float8_e4m3fn, ``[m, ceil(k/128)]`` float32): one scale per row per 128 of K.
    b: (``[n, k]`` float8_e4m3fn, float32 scales): ``[ceil(n/128), ceil(k/128)]``, one per
        128x128 block (the weight recipe ``(1, 128, 128)``), or ``[n, ceil(k/128)]``, one
        per row per 128 of K (``(1, 1, 128)``, as weight gradients use).
    d: ``[m, n]``, torch.bfloat16 or torch.float32; written.
    c: optional ``[m, n]`` torch.float32 added to the product (d must then be
        float32; c may be d itself, to accumulate).
    recipe: the scale granularity; by default read from b's scale shape.
    """
    _dense_gemm(a, b, d, c, recipe, ("a", "b", "d"))


def gemm_fp8_fp8_bf16_nt(
    lhs: tuple[torch.Tensor, torch.Tensor], rhs: tuple[torch.Tensor, torch.Tensor], out: torch.Tensor
) -> None:
    """out = lhs @ rhs.T: DeepGEMM's normal GEMM (its February 2025 name).

    lhs: (``[m, k]`` float8_e4m3fn, ``[m, ceil(k/128)]`` float32 1x128 scales).
    rhs: (``[n, k]`` float8_e4m3fn, ``[ceil(n/128), ceil(k/128)]`` float32 128x128 scales).
    out: ``[m, n]`` torch.bfloat16; written.
    """
    check_tensor("out", out, dtype=torch.bfloat16)
    _dense_gemm(lhs, rhs, out, None, RECIPES[0], ("lhs", "rhs", "out"))


def _check_contiguous_layout(m_indices: torch.Tensor, num_groups: int) -> None:
    """Every value is a group or -1, and every aligned block of 128 rows holds one
    group (besides -1): checks that need a device sync, so run where range checks do."""
    check_range("m_indices", m_indices, 0, num_groups, ignore=-1)
    if m_indices.numel() == 0 or not backend.range_checks_enabled(m_indices.device):
        return
    alignment = get_m_alignment_for_contiguous_layout()
    blocks = torch.nn.functional.pad(m_indices, (0, -m_indices.numel() % alignment), value=-1).view(-1, alignment)
    highest = blocks.amax(dim=1)
    lowest = torch.where(blocks >= 0, blocks, num_groups).amin(dim=1)
    mixed = ((highest >= 0) & (lowest != highest)).nonzero()
    if mixed.numel():
        block = int(mixed[0])
        raise ValueError(
            f"m_indices must give each aligned block of {alignment} rows one group (or -1); rows "
            f"{block * alignment}..{(block + 1) * alignment - 1} mix groups {int(lowest[block])} and {int(highest[block])}"
        )


def m_grouped_gemm_fp8_fp8_bf16_nt_contiguous(
    lhs: tuple[torch.Tensor, torch.Tensor],
    rhs: tuple[torch.Tensor, torch.Tensor],
    out: torch.Tensor,
    m_indices: torch.Tensor,
) -> None:
    """out[i] = lhs[i] @ rhs[m_indices[i]].T: the MoE grouped GEMM, contiguous layout.

    lhs: (``[m_sum, k]`` float8_e4m3fn, ``[m_sum, ceil(k/128)]`` float32): every group's
        rows back to back, each group's segment aligned to
        :func:`get_m_alignment_for_contiguous_layout` (128) rows.
    rhs: (``[num_groups, n, k]`` float8_e4m3fn, ``[num_groups, ceil(n/128), ceil(k/128)]`` float32).
    out: ``[m_sum, n]`` torch.bfloat16; rows whose m_indices is -1 are left untouched.
    m_indices: ``[m_sum]`` torch.int32, contiguous: each row's group, or -1 for a padding row.
    """
    x, sa = _operand("lhs", lhs, ("m_sum", "k"))
    m, k = x.shape
    y, sb = _operand("rhs", rhs, ("num_groups", "n", k), x.device)
    num_groups, n, _ = y.shape
    _check_sizes("rhs[0]", n=n, k=k)
    check_tensor("lhs[1]", sa, shape=(m, ceil_div(k, GROUP)))
    check_tensor("rhs[1]", sb, shape=(num_groups, ceil_div(n, GROUP), ceil_div(k, GROUP)))
    check_tensor("out", out, dtype=torch.bfloat16, shape=(m, n), device=x.device)
    check_tensor("m_indices", m_indices, dtype=torch.int32, shape=(m,), device=x.device, contiguous=True)
    _check_contiguous_layout(m_indices, num_groups)
    impl = _implementation("m_grouped_fp8_gemm_nt_contiguous", x.device)
    impl.m_grouped_fp8_gemm_nt_contiguous(x, sa, y, sb, out, m_indices)


def m_grouped_gemm_fp8_fp8_bf16_nt_masked(
    lhs: tuple[torch.Tensor, torch.Tensor],
    rhs: tuple[torch.Tensor, torch.Tensor],
    out: torch.Tensor,
    masked_m: torch.Tensor,
    expected_m: int,
) -> None:
    """out[g, :masked_m[g]] = lhs[g, :masked_m[g]] @ rhs[g].T: the MoE grouped GEMM,
    masked layout (what DeepEP's low-latency dispatch produces).

    lhs: (``[num_groups, m_max, k]`` float8_e4m3fn, ``[num_groups, m_max, ceil(k/128)]`` float32).
    rhs: (``[num_groups, n, k]`` float8_e4m3fn, ``[num_groups, ceil(n/128), ceil(k/128)]`` float32).
    out: ``[num_groups, m_max, n]`` torch.bfloat16; rows past masked_m[g] are left untouched.
    masked_m: ``[num_groups]`` torch.int32, contiguous, each in [0, m_max]; may stay on the GPU.
    expected_m: a hint for the typical masked_m, > 0 (picks the GPU tile size).
    """
    x, sa = _operand("lhs", lhs, ("num_groups", "m_max", "k"))
    num_groups, m_max, k = x.shape
    y, sb = _operand("rhs", rhs, (num_groups, "n", k), x.device)
    n = y.shape[1]
    _check_sizes("rhs[0]", n=n, k=k)
    check_tensor("lhs[1]", sa, shape=(num_groups, m_max, ceil_div(k, GROUP)))
    check_tensor("rhs[1]", sb, shape=(num_groups, ceil_div(n, GROUP), ceil_div(k, GROUP)))
    check_tensor("out", out, dtype=torch.bfloat16, shape=(num_groups, m_max, n), device=x.device)
    check_tensor("masked_m", masked_m, dtype=torch.int32, shape=(num_groups,), device=x.device, contiguous=True)
    check_positive("expected_m", expected_m)
    check_range("masked_m", masked_m, 0, m_max + 1)
    impl = _implementation("m_grouped_fp8_gemm_nt_masked", x.device)
    impl.m_grouped_fp8_gemm_nt_masked(x, sa, y, sb, out, masked_m, expected_m)


def k_grouped_fp8_gemm_tn_contiguous(
    a: tuple[torch.Tensor, torch.Tensor],
    b: tuple[torch.Tensor, torch.Tensor],
    d: torch.Tensor,
    ks: Sequence[int],
    ks_tensor: torch.Tensor | None = None,
    c: torch.Tensor | None = None,
) -> None:
    """d[g] = c[g] + a_g.T @ b_g, with a_g, b_g the g-th run of ks[g] rows: the MoE
    weight-gradient GEMM, grouped along K (the tokens).

    a: (``[sum(ks), m]`` float8_e4m3fn, ``[sum(ceil(ks[g]/128)), m]`` float32): one scale
        per column per 128 rows of a group (each group starts a new scale row; with
        every ks[g] a multiple of 128, as DeepGEMM requires, that is ``[sum(ks)/128, m]``).
    b: (``[sum(ks), n]`` float8_e4m3fn, ``[sum(ceil(ks[g]/128)), n]`` float32), likewise.
    d: ``[num_groups, m, n]`` torch.float32; written.
    ks: the groups' sizes, each >= 0 (an empty group gets c[g], or zeros).
    ks_tensor: ks as a torch.int32 tensor on the device (DeepGEMM's kernels read it);
        optional here, checked against ks where range checks run.
    c: optional ``[num_groups, m, n]`` torch.float32 to add (may be d itself).
    """
    x, sa = _operand("a", a, ("sum_k", "m"))
    sum_k, m = x.shape
    y, sb = _operand("b", b, (sum_k, "n"), x.device)
    n = y.shape[1]
    if not all(isinstance(k, int) and not isinstance(k, bool) for k in ks):
        raise TypeError(f"ks must be a sequence of ints; got {ks!r}")
    ks = list(ks)
    check_tensor("d", d, dtype=torch.float32, shape=(len(ks), m, n), device=x.device)
    if any(k < 0 for k in ks) or sum(ks) != sum_k:
        raise ValueError(f"ks must be sizes >= 0 that add up to a[0].shape[0] ({sum_k}); got {ks}")
    scale_rows = sum(ceil_div(k, GROUP) for k in ks)
    check_tensor("a[1]", sa, shape=(scale_rows, m))
    check_tensor("b[1]", sb, shape=(scale_rows, n))
    if ks_tensor is not None:
        check_tensor("ks_tensor", ks_tensor, dtype=torch.int32, shape=(len(ks),), device=x.device)
        if backend.range_checks_enabled(ks_tensor.device) and ks_tensor.tolist() != ks:
            raise ValueError(f"ks_tensor must hold ks ({ks}); holds {ks_tensor.tolist()}")
    if c is not None:
        check_tensor("c", c, dtype=torch.float32, shape=(len(ks), m, n), device=x.device)
    impl = _implementation("k_grouped_fp8_gemm_tn_contiguous", x.device)
    impl.k_grouped_fp8_gemm_tn_contiguous(x, sa, y, sb, d, ks, c)


# The FP8 linear layer uses the GEMMs above, hence imported last.
from dsinfra.deep_gemm.linear import FP8Linear, FP8LinearFunction  # noqa: E402

# The indexer's scores of DeepSeek-V3.2.
from dsinfra.deep_gemm.mqa_logits import (  # noqa: E402
    fp8_fp4_mqa_logits,
    fp8_fp4_paged_mqa_logits,
    fp8_mqa_logits,
    fp8_paged_mqa_logits,
    get_paged_mqa_logits_metadata,
)

# DeepGEMM's later names for the same operations.
m_grouped_fp8_gemm_nt_contiguous = m_grouped_gemm_fp8_fp8_bf16_nt_contiguous
m_grouped_fp8_gemm_nt_masked = m_grouped_gemm_fp8_fp8_bf16_nt_masked
get_mn_major_tma_aligned_tensor = get_col_major_tma_aligned_tensor

__all__ = [
    "FP8Linear",
    "FP8LinearFunction",
    "OPERATIONS",
    "align",
    "calc_diff",
    "cast_back_from_fp4",
    "ceil_div",
    "ceil_to_ue8m0",
    "fp8_fp4_mqa_logits",
    "fp8_fp4_paged_mqa_logits",
    "fp8_gemm_nt",
    "fp8_mqa_logits",
    "fp8_paged_mqa_logits",
    "gemm_fp8_fp8_bf16_nt",
    "get_col_major_tma_aligned_tensor",
    "get_k_alignment_for_contiguous_layout",
    "get_m_alignment_for_contiguous_layout",
    "get_mk_alignment_for_contiguous_layout",
    "get_mn_major_tma_aligned_tensor",
    "get_num_sms",
    "get_paged_mqa_logits_metadata",
    "get_theoretical_mk_alignment_for_contiguous_layout",
    "get_tma_aligned_size",
    "k_grouped_fp8_gemm_tn_contiguous",
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
    "set_mk_alignment_for_contiguous_layout",
    "set_num_sms",
    "transpose_packed_fp4",
    "unpack_ue8m0_from_int",
]
