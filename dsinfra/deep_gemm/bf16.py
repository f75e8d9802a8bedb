"""DeepGEMM's BF16 GEMMs and its cuBLASLt wrappers: the layouts of the FP8 API
(:mod:`dsinfra.deep_gemm.gemm`) on bfloat16 operands, without scales.

Every product goes through the float GEMM ``bf16_gemm_nt`` that
:func:`dsinfra.backend.choose` picks: float32 in the reference; ``torch.matmul``
in the torch path (a bfloat16 matmul accumulating in float32 where the output is
bfloat16, nothing is added and the CPU multiplies bf16 natively, float32
otherwise) and on GPUs (cuBLAS, which
DeepGEMM's own BF16 kernels set out to match). Grouped forms run one product per
group, reading the group sizes on the host.
"""

from __future__ import annotations

import torch

from dsinfra.deep_gemm.gemm import OUT_DTYPES, check_options, dense, k_grouped, m_grouped_contiguous, m_grouped_masked
from dsinfra.deep_gemm.grouping import gathered_rows, k_groups
from dsinfra.deep_gemm.operands import Operand
from dsinfra.fp8 import fp8_to_float
from dsinfra.validation import check_positive, check_tensor


def _bf16(name: str, x: object, ndim: int) -> Operand:
    check_tensor(name, x, dtype=torch.bfloat16, ndim=ndim)
    return Operand(x, None)


def _check_flags(**flags: object) -> None:
    for name, flag in flags.items():
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be a bool; got {type(flag).__name__}")


def bf16_gemm_nt(a, b, d, c=None, compiled_dims="nk") -> None:
    """d = c + a @ b.T. a: ``[m, k]``, b: ``[n, k]``, torch.bfloat16, any strides;
    d: ``[m, n]`` torch.bfloat16 or torch.float32, written; c: optional, d's shape
    and dtype (may be d itself)."""
    check_options(compiled_dims)
    dense(_bf16("a", a, 2), _bf16("b", b, 2), d, c)


def bf16_gemm_nn(a, b, d, c=None, compiled_dims="nk") -> None:
    """d = c + a @ b with b ``[k, n]``; otherwise as :func:`bf16_gemm_nt`."""
    check_tensor("b", b, ndim=2)
    bf16_gemm_nt(a, b.T, d, c, compiled_dims)


def bf16_gemm_tn(a, b, d, c=None, compiled_dims="mn") -> None:
    """d = c + a.T @ b with a ``[k, m]`` and b ``[k, n]``."""
    check_tensor("a", a, ndim=2)
    check_tensor("b", b, ndim=2)
    bf16_gemm_nt(a.T, b.T, d, c, compiled_dims)


def bf16_gemm_tt(a, b, d, c=None, compiled_dims="mn") -> None:
    """d = c + a.T @ b.T with a ``[k, m]`` and b ``[n, k]``."""
    check_tensor("a", a, ndim=2)
    bf16_gemm_nt(a.T, b, d, c, compiled_dims)


def m_grouped_bf16_gemm_nt_contiguous(
    a, b, d, grouped_layout, compiled_dims="nk", use_psum_layout=False, ensure_zero_padding=True, expected_m_for_psum_layout=None
) -> None:
    """d[r] = a[r] @ b[g].T for each row r of group g, the layouts of
    :func:`dsinfra.deep_gemm.m_grouped_fp8_fp4_gemm_nt_contiguous`: a ``[m, k]``,
    b ``[num_groups, n, k]`` torch.bfloat16, d ``[m, n]`` torch.bfloat16."""
    check_options(compiled_dims)
    _check_flags(use_psum_layout=use_psum_layout, ensure_zero_padding=ensure_zero_padding)
    if expected_m_for_psum_layout is not None:
        if not use_psum_layout:
            raise ValueError("expected_m_for_psum_layout goes with use_psum_layout=True")
        check_positive("expected_m_for_psum_layout", expected_m_for_psum_layout)
    x, y = _bf16("a", a, 2), _bf16("b", b, 3)
    m_grouped_contiguous(x, y, d, grouped_layout, use_psum_layout, ensure_zero_padding, ("a", "b", "d", "grouped_layout"))


def m_grouped_bf16_gemm_nn_contiguous(a, b, d, grouped_layout, compiled_dims="nk", use_psum_layout=False, ensure_zero_padding=True) -> None:
    """:func:`m_grouped_bf16_gemm_nt_contiguous` with b ``[num_groups, k, n]``."""
    check_tensor("b", b, ndim=3)
    m_grouped_bf16_gemm_nt_contiguous(a, b.transpose(1, 2), d, grouped_layout, compiled_dims, use_psum_layout, ensure_zero_padding)


def m_grouped_bf16_gemm_nt_masked(a, b, d, masked_m, expected_m, compiled_dims="nk") -> None:
    """d[g, :masked_m[g]] = a[g, :masked_m[g]] @ b[g].T: a ``[num_groups, m_max, k]``,
    b ``[num_groups, n, k]``, d ``[num_groups, m_max, n]``, torch.bfloat16; rows past
    masked_m[g] are left alone."""
    check_options(compiled_dims)
    m_grouped_masked(_bf16("a", a, 3), _bf16("b", b, 3), d, masked_m, expected_m, ("a", "b", "d"))


def k_grouped_bf16_gemm_tn_contiguous(a, b, d, ks_cpu, grouped_layout=None, c=None, compiled_dims="mn", use_psum_layout=False) -> None:
    """d[g] = c[g] + a_g.T @ b_g over groups of rows of a ``[sum_k, m]`` and b
    ``[sum_k, n]`` (torch.bfloat16), as :func:`dsinfra.deep_gemm.k_grouped_fp8_gemm_tn_contiguous`
    takes them; d ``[num_groups, m, n]`` torch.float32."""
    check_options(compiled_dims)
    _check_flags(use_psum_layout=use_psum_layout)
    x, y = _bf16("a", a, 2), _bf16("b", b, 2)
    groups = k_groups("ks_cpu", ks_cpu, grouped_layout, a.shape[0], use_psum_layout)
    rows = gathered_rows(groups, a.shape[0], a.device)
    if rows is not None:
        x, y = Operand(a[rows], None), Operand(b[rows], None)
    k_grouped(x, y, d, c, [count for _, count in groups])


_CUBLASLT_DTYPES = (torch.bfloat16, torch.float16, torch.float32, torch.float8_e4m3fn)


def _plain(name: str, x: object) -> Operand:
    check_tensor(name, x, dtype=_CUBLASLT_DTYPES, ndim=2)
    return Operand(fp8_to_float(x) if x.dtype == torch.float8_e4m3fn else x, None)


def cublaslt_gemm_nt(a, b, d, c=None) -> None:
    """d = c + a @ b.T for unscaled operands (bfloat16, float16, float32 or
    float8_e4m3fn values), d torch.bfloat16 or torch.float32: DeepGEMM's cuBLASLt
    wrapper, here the float GEMM."""
    check_tensor("d", d, dtype=OUT_DTYPES)
    dense(_plain("a", a), _plain("b", b), d, c)


def cublaslt_gemm_nn(a, b, d, c=None) -> None:
    """d = c + a @ b with b ``[k, n]``."""
    check_tensor("b", b, ndim=2)
    cublaslt_gemm_nt(a, b.T, d, c)


def cublaslt_gemm_tn(a, b, d, c=None) -> None:
    """d = c + a.T @ b with a ``[k, m]``, b ``[k, n]``."""
    check_tensor("a", a, ndim=2)
    check_tensor("b", b, ndim=2)
    cublaslt_gemm_nt(a.T, b.T, d, c)


def cublaslt_gemm_tt(a, b, d, c=None) -> None:
    """d = c + a.T @ b.T with a ``[k, m]``, b ``[n, k]``."""
    check_tensor("a", a, ndim=2)
    cublaslt_gemm_nt(a.T, b, d, c)
