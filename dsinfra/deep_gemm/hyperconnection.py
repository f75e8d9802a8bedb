"""DeepGEMM's hyper-connection pre-norm GEMM: one pass over a that gives both its
product with b and its rows' sums of squares (what an RMS norm of a needs)."""

from __future__ import annotations

import torch

from dsinfra.deep_gemm.gemm import dense
from dsinfra.deep_gemm.operands import Operand
from dsinfra.deep_gemm.utils import ceil_div
from dsinfra.validation import check_positive, check_tensor


def tf32_hc_prenorm_gemm(a: torch.Tensor, b: torch.Tensor, d: torch.Tensor, sqr_sum: torch.Tensor, num_splits: int | None = None) -> None:
    """d = a @ b.T and sqr_sum = (a * a).sum(-1), both in float32.

    a: ``[m, k]`` torch.bfloat16; b: ``[n, k]`` torch.float32.
    d: ``[m, n]`` torch.float32 and sqr_sum ``[m]`` torch.float32, written; or with
        ``num_splits`` ``[num_splits, m, n]`` and ``[num_splits, m]``: the partial sums
        over num_splits consecutive ranges of k, to be added up by the caller.
    DeepGEMM multiplies in TF32; dsinfra in float32.
    """
    check_tensor("a", a, dtype=torch.bfloat16, ndim=2)
    m, k = a.shape
    check_tensor("b", b, dtype=torch.float32, shape=("n", k), device=a.device)
    n = b.shape[0]
    splits = 1 if num_splits is None else check_positive("num_splits", num_splits)
    leading = () if num_splits is None else (splits,)
    check_tensor("d", d, dtype=torch.float32, shape=(*leading, m, n), device=a.device)
    check_tensor("sqr_sum", sqr_sum, dtype=torch.float32, shape=(*leading, m), device=a.device, contiguous=True)
    d, sqr_sum = d.view(splits, m, n), sqr_sum.view(splits, m)
    step = ceil_div(k, splits)
    for split in range(splits):
        x = a[:, split * step : (split + 1) * step].float()
        dense(Operand(x, None), Operand(b[:, split * step : (split + 1) * step], None), d[split], None)
        torch.sum(x * x, dim=-1, out=sqr_sum[split])
