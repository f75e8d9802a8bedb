"""``deep_ep.utils.math``: the numerics of DeepEP's tests.

:func:`calc_diff` is DeepEP's measure (DeepGEMM's, taken on ``x + 1`` and
``y + 1``, so that all-zero tensors compare by their offset); the FP8 casts are
dsinfra's (:mod:`dsinfra.fp8`, the same 1x128 groups and float32 scales), with
:func:`per_token_cast_back` also reading UE8M0 exponents packed four to an int32.
"""

from __future__ import annotations

import torch

from dsinfra import fp8
from dsinfra.deep_gemm.ue8m0 import unpack_ue8m0_from_int
from dsinfra.deep_gemm.utils import align, ceil_div
from dsinfra.testing import numerics
from dsinfra.testing.numerics import count_bytes

__all__ = [
    "align", "calc_diff", "ceil_div", "count_bytes", "create_grouped_scores", "hash_tensor", "hash_tensors",
    "inplace_unique", "per_token_cast_back", "per_token_cast_to_fp8", "safe_div",
]

per_token_cast_to_fp8 = fp8.per_token_cast_to_fp8


def calc_diff(x: torch.Tensor, y: torch.Tensor) -> float:
    """``1 - 2·Σ(x+1)(y+1) / Σ((x+1)² + (y+1)²)`` in float64: 0 for equal tensors."""
    return numerics.calc_diff(x.double() + 1, y.double() + 1)


def safe_div(a, b) -> float:
    """``a / b``, and 0 for ``0 / 0``; any other division by zero raises ZeroDivisionError."""
    if b == 0 and a == 0:
        return 0
    return a / b


def per_token_cast_back(x_fp8: torch.Tensor, x_scales: torch.Tensor) -> torch.Tensor:
    """FP8 rows [m, n] and their scales (float32, or int32 packing four UE8M0
    exponents each, any shape holding m * ceil(n / 128) of them in row order)
    -> bfloat16 [m, n]."""
    if x_fp8.numel() == 0:
        return x_fp8.to(torch.bfloat16)
    if x_fp8.dim() != 2:
        raise ValueError(f"x_fp8 must be [m, n]; got shape {list(x_fp8.shape)}")
    m, n = x_fp8.shape
    scales = unpack_ue8m0_from_int(x_scales.contiguous()) if x_scales.dtype == torch.int32 else x_scales
    groups = ceil_div(n, fp8.GROUP)
    if scales.numel() != m * groups:
        raise ValueError(f"x_scales must hold {m} x {groups} scales for x_fp8 of shape {[m, n]}; got shape {list(x_scales.shape)}")
    return fp8.per_token_cast_back(x_fp8, scales.reshape(m, groups).float(), dtype=torch.bfloat16)


def inplace_unique(x: torch.Tensor, num_slots: int) -> None:
    """Rewrite each row of ``x`` [rows, k] (ids in [0, num_slots), -1 for none) as
    its distinct ids in descending order, then -1 (at most num_slots of them)."""
    if x.dim() != 2:
        raise ValueError(f"x must be [rows, k]; got shape {list(x.shape)}")
    present = torch.zeros(x.shape[0], num_slots + 1, dtype=torch.bool, device=x.device)
    present.scatter_(1, x.masked_fill(x < 0, num_slots).long(), True)
    ids = torch.arange(num_slots, dtype=x.dtype, device=x.device).expand(x.shape[0], -1)
    distinct = ids.masked_fill(~present[:, :num_slots], -1).sort(dim=1, descending=True).values
    width = min(num_slots, x.shape[1])
    x.fill_(-1)
    x[:, :width] = distinct[:, :width]


def create_grouped_scores(scores: torch.Tensor, group_idx: torch.Tensor, num_groups: int) -> torch.Tensor:
    """``scores`` [tokens, experts] with the experts outside each token's groups
    ``group_idx`` [tokens, groups chosen] set to zero (experts split evenly into
    ``num_groups`` groups)."""
    num_tokens, num_experts = scores.shape
    chosen = torch.zeros(num_tokens, num_groups, dtype=torch.bool, device=scores.device).scatter_(1, group_idx, True)
    return (scores.view(num_tokens, num_groups, -1) * chosen.unsqueeze(-1)).view(num_tokens, num_experts)


def hash_tensor(t: torch.Tensor) -> int:
    """The sum of ``t``'s bytes read as int32 (a cheap fingerprint that any changed bit moves)."""
    return int(t.view(torch.int32).sum().item())


def hash_tensors(*tensors) -> int:
    """The XOR of :func:`hash_tensor` over the tensors given (nested tuples and lists included, None skipped)."""
    value = 0
    for t in tensors:
        if isinstance(t, (tuple, list)):
            value ^= hash_tensors(*t)
        elif isinstance(t, torch.Tensor):
            value ^= hash_tensor(t)
    return value
