"""``deep_gemm.legacy``: DeepGEMM's Triton kernels for A100, BF16 grouped GEMMs
whose operands may be gathered through row indices ("fused" gathers).

Each gathers the rows it is given, then runs the BF16 grouped GEMMs of
:mod:`dsinfra.deep_gemm.bf16`.
"""

from __future__ import annotations

import torch

from dsinfra.deep_gemm.bf16 import k_grouped_bf16_gemm_tn_contiguous, m_grouped_bf16_gemm_nt_contiguous
from dsinfra.validation import check_range, check_tensor


def m_grouped_bf16_gemm_nt_contiguous_tl(a: torch.Tensor, b: torch.Tensor, d: torch.Tensor, m_indices: torch.Tensor) -> None:
    """d[r] = a[r] @ b[m_indices[r]].T (see :func:`dsinfra.deep_gemm.m_grouped_bf16_gemm_nt_contiguous`)."""
    m_grouped_bf16_gemm_nt_contiguous(a, b, d, m_indices)


def m_grouped_bf16_gemm_nn_contiguous_tl(a: torch.Tensor, b: torch.Tensor, d: torch.Tensor, m_indices: torch.Tensor) -> None:
    """:func:`m_grouped_bf16_gemm_nt_contiguous_tl` with b ``[num_groups, k, n]``."""
    check_tensor("b", b, ndim=3)
    m_grouped_bf16_gemm_nt_contiguous(a, b.mT, d, m_indices)


def _gathered(name: str, x: torch.Tensor, indices: torch.Tensor, indices_name: str) -> torch.Tensor:
    check_tensor(name, x, dtype=torch.bfloat16, ndim=2)
    check_tensor(indices_name, indices, dtype=torch.int32, ndim=1, device=x.device)
    check_range(indices_name, indices, 0, x.shape[0])
    return x[indices.long()]


def a_fused_m_grouped_bf16_gemm_nt_contiguous_tl(a: torch.Tensor, b: torch.Tensor, d: torch.Tensor, mappings: tuple) -> None:
    """d[r] = a[m_row_indices[r]] @ b[m_indices[r]].T with mappings = (m_indices, m_row_indices),
    both ``[m]`` torch.int32: the contiguous layout built without copying a's rows."""
    m_indices, m_row_indices = mappings
    m_grouped_bf16_gemm_nt_contiguous(_gathered("a", a, m_row_indices, "m_row_indices"), b, d, m_indices)


def a_fused_m_grouped_bf16_gemm_nn_contiguous_tl(a: torch.Tensor, b: torch.Tensor, d: torch.Tensor, mappings: tuple) -> None:
    """:func:`a_fused_m_grouped_bf16_gemm_nt_contiguous_tl` with b ``[num_groups, k, n]``."""
    check_tensor("b", b, ndim=3)
    a_fused_m_grouped_bf16_gemm_nt_contiguous_tl(a, b.mT, d, mappings)


def _k_grouped(a: torch.Tensor, b: torch.Tensor, d: torch.Tensor, handle: tuple, acc: bool) -> None:
    """d[g] (+)= a[k_start[g]:k_end[g]].T @ b[k_start[g]:k_end[g]] (a and b already gathered)."""
    _, k_start, k_end = handle
    for name, bound in (("k_start", k_start), ("k_end", k_end)):
        check_tensor(name, bound, dtype=torch.int32, ndim=1, device=a.device)
    if not isinstance(acc, bool):
        raise TypeError(f"acc must be a bool; got {type(acc).__name__}")
    ranges = list(zip(k_start.tolist(), k_end.tolist()))
    if any(not 0 <= start <= end <= a.shape[0] for start, end in ranges):
        raise ValueError(f"k_start and k_end must give ranges within the {a.shape[0]} rows; got {ranges}")
    rows = torch.cat([torch.arange(start, end, dtype=torch.int64) for start, end in ranges] or [torch.zeros(0, dtype=torch.int64)]).to(a.device)
    ks = [end - start for start, end in ranges]
    k_grouped_bf16_gemm_tn_contiguous(a[rows], b[rows], d, ks, None, d if acc else None)


def a_fused_k_grouped_bf16_gemm_tn_contiguous_tl(a: torch.Tensor, b: torch.Tensor, d: torch.Tensor, handle: tuple, acc: bool) -> None:
    """d[g] = (d[g] if acc else 0) + a[k_indices[r]].T @ b[r] over the rows r of group g,
    handle = (k_indices ``[sum_k]``, k_start ``[num_groups]``, k_end ``[num_groups]``) torch.int32;
    a ``[*, m]``, b ``[sum_k, n]`` torch.bfloat16, d ``[num_groups, m, n]`` torch.float32."""
    _k_grouped(_gathered("a", a, handle[0], "k_indices"), b, d, handle, acc)


def b_fused_k_grouped_bf16_gemm_tn_contiguous_tl(a: torch.Tensor, b: torch.Tensor, d: torch.Tensor, handle: tuple, acc: bool) -> None:
    """As :func:`a_fused_k_grouped_bf16_gemm_tn_contiguous_tl` with b's rows gathered:
    d[g] (+)= a[r].T @ b[k_indices[r]]."""
    _k_grouped(a, _gathered("b", b, handle[0], "k_indices"), d, handle, acc)
