"""DeepGEMM's einsum kernels: a few contractions of attention and MoE layers, on
bfloat16 (:func:`einsum`) or FP8 (:func:`fp8_einsum`) operands.

Each expression is one GEMM, or one per head, run through the GEMMs of
:mod:`dsinfra.deep_gemm.gemm` (FP8 operands scaled per 128 of K on the FP8
implementations, bfloat16 on the float GEMM), so every backend serves them.
"""

from __future__ import annotations

import torch

from dsinfra.deep_gemm.gemm import OUT_DTYPES, check_accumulator, dense
from dsinfra.deep_gemm.operands import Operand, check_granularity, operand, pair
from dsinfra.validation import check_tensor

EINSUM_EXPRESSIONS = ("bmk,bnk->mn", "bhr,hdr->bhd", "bhd,hdr->bhr")
FP8_EINSUM_EXPRESSIONS = ("bhr,hdr->bhd", "bhd,hdr->bhr", "bhd,bhr->hdr")


def _check_expression(expr: object, supported: tuple[str, ...]) -> None:
    if expr not in supported:
        raise ValueError(f"expr must be one of {', '.join(supported)}; got {expr!r}")


def einsum(expr: str, a: torch.Tensor, b: torch.Tensor, d: torch.Tensor, c: torch.Tensor | None = None, use_cublaslt: bool = False) -> None:
    """d = c + einsum(expr, a, b) for bfloat16 a and b.

    expr: ``"bmk,bnk->mn"`` (a ``[s, m, k]``, b ``[s, n, k]``: a sum of s products),
        ``"bhr,hdr->bhd"`` or ``"bhd,hdr->bhr"`` (one product per head h).
    d: torch.bfloat16 or torch.float32 of the result's shape; written. c: optional,
        d's shape and dtype (may be d itself).
    use_cublaslt: DeepGEMM's choice of cuBLASLt kernels; of no effect here.
    """
    _check_expression(expr, EINSUM_EXPRESSIONS)
    if not isinstance(use_cublaslt, bool):
        raise TypeError(f"use_cublaslt must be a bool; got {type(use_cublaslt).__name__}")
    check_tensor("a", a, dtype=torch.bfloat16, ndim=3)
    check_tensor("b", b, dtype=torch.bfloat16, ndim=3, device=a.device)
    check_tensor("d", d, dtype=OUT_DTYPES, device=a.device)
    check_accumulator(c, d)
    if expr == "bmk,bnk->mn":
        if a.shape[0] != b.shape[0]:
            raise ValueError(f"a and b must have the same s; got shapes {list(a.shape)} and {list(b.shape)}")
        x, y = a.permute(1, 0, 2).flatten(1), b.permute(1, 0, 2).flatten(1)  # the sum over s joins k
        dense(Operand(x, None), Operand(y, None), d, c)
        return
    heads = a.shape[1]
    if b.shape[0] != heads:
        raise ValueError(f"b must have a's {heads} heads first; got shape {list(b.shape)}")
    check_tensor("d", d, ndim=3)
    for head in range(heads):
        y = b[head] if expr == "bhr,hdr->bhd" else b[head].T
        dense(Operand(a[:, head], None), Operand(y, None), d[:, head], None if c is None else c[:, head])


def _head(name: str, value: object, head: int, dim: int, granularity: tuple[int, int], weight: bool, transpose: bool) -> Operand:
    """The operand of one head: values and scales indexed at ``head`` along ``dim``, transposed if asked."""
    values, scales = pair(name, value)
    check_tensor(f"{name}[0]", values, ndim=3)
    check_tensor(f"{name}[1]", scales, ndim=3)
    values, scales = values.select(dim, head), scales.select(dim, head)
    if transpose:
        values, scales = values.T, scales.T
    return operand(name, (values, scales), granularity, weight)


def fp8_einsum(expr: str, a: tuple, b: tuple, d: torch.Tensor, c: torch.Tensor | None = None, recipe=(1, 128, 128)) -> None:
    """d = c + einsum(expr, a, b) for FP8 operands ``(values, scales)``, one product per head h.

    ``"bhr,hdr->bhd"`` and ``"bhd,hdr->bhr"``: a ``[b, h, k]`` scaled per token and 128 of
    its last dimension (scales ``[b, h, ceil(k/128)]``), b ``[h, d, r]`` per 128x128 block
    (``[h, ceil(d/128), ceil(r/128)]``). ``"bhd,bhr->hdr"`` (recipe (1, 1, 128)): both
    scaled per column over 128 tokens (scales ``[ceil(b/128), h, d]`` and
    ``[ceil(b/128), h, r]``), d and c torch.float32 ``[h, d, r]``.
    d: torch.bfloat16 or torch.float32; c: optional, d's shape and dtype (may be d).
    recipe: (gran_m, gran_n, gran_k).
    """
    _check_expression(expr, FP8_EINSUM_EXPRESSIONS)
    gran_m, gran_n, gran_k = check_granularity("recipe", recipe, 3)
    check_tensor("d", d, dtype=OUT_DTYPES, ndim=3)
    check_accumulator(c, d)
    values, _ = pair("a", a)
    check_tensor("a[0]", values, ndim=3)
    heads = values.shape[1]
    for head in range(heads):
        if expr == "bhd,bhr->hdr":
            x = _head("a", a, head, 1, (gran_m, gran_k), False, transpose=True)
            y = _head("b", b, head, 1, (gran_n, gran_k), True, transpose=True)
            out = d[head]
        else:
            x = _head("a", a, head, 1, (gran_m, gran_k), False, transpose=False)
            y = _head("b", b, head, 0, (gran_n, gran_k), True, transpose=expr == "bhd,hdr->bhr")
            out = d[:, head]
        dense(x, y, out, None if c is None else (c[head] if expr == "bhd,bhr->hdr" else c[:, head]))
