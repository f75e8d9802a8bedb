"""Numerical comparisons used across the tests."""

from __future__ import annotations

import torch


def calc_diff(x: torch.Tensor, y: torch.Tensor) -> float:
    """DeepGEMM's similarity measure: ``1 - 2·Σxy / Σ(x² + y²)`` in float64.

    0 for identical tensors, about ``relative_error² / 2`` for close ones, 1 for
    uncorrelated ones and 2 for ``y == -x``. Two all-zero tensors (or empty
    ones) give 0. NaN anywhere gives NaN, so a NaN never passes a bound.
    """
    if x.shape != y.shape:
        raise ValueError(f"calc_diff needs tensors of one shape; got {list(x.shape)} and {list(y.shape)}")
    x, y = x.double(), y.double()
    denominator = (x * x + y * y).sum()
    if denominator == 0:
        return 0.0
    return float(1 - 2 * (x * y).sum() / denominator)


def count_bytes(*tensors) -> int:
    """Bytes held by the tensors given (nested tuples and lists included, None skipped)."""
    total = 0
    for t in tensors:
        if isinstance(t, (tuple, list)):
            total += count_bytes(*t)
        elif t is not None:
            total += t.numel() * t.element_size()
    return total
