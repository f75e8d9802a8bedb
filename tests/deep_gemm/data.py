"""Operands for the DeepGEMM tests: seeded float data, its FP8 casts, and the
unquantised products they approximate."""

from __future__ import annotations

import os

import torch

from dsinfra.deep_gemm import align, get_m_alignment_for_contiguous_layout, per_block_cast_to_fp8, per_token_cast_to_fp8
from dsinfra.testing import generator, randn

FP8_NAN = 0x7F  # float8_e4m3fn's NaN bit pattern


def call(implementation: str, fn, *args, **kwargs):
    """Run ``fn`` with ``DSINFRA_BACKEND`` set to ``implementation``."""
    previous = os.environ.get("DSINFRA_BACKEND")
    os.environ["DSINFRA_BACKEND"] = implementation
    try:
        return fn(*args, **kwargs)
    finally:
        if previous is None:
            del os.environ["DSINFRA_BACKEND"]
        else:
            os.environ["DSINFRA_BACKEND"] = previous


def to(device, *tensors):
    return [t.to(device) for t in tensors]


def stacked_block_casts(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w: [num_groups, n, k] -> per-group 128x128 casts, stacked."""
    pairs = [per_block_cast_to_fp8(w[g]) for g in range(w.shape[0])]
    return torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])


def dense(m: int, n: int, k: int, seed: int = 0):
    """(a, b, x @ y.T): a per-token cast of x [m, k], b a per-block cast of y [n, k]."""
    x, y = randn(m, k, seed=seed), randn(n, k, seed=seed + 1)
    return per_token_cast_to_fp8(x), per_block_cast_to_fp8(y), x @ y.T


def contiguous(group_sizes: list[int], n: int, k: int, seed: int = 0):
    """(lhs, rhs, m_indices, expected): each group's rows padded to the alignment
    with -1 rows whose data and scales are NaN (which must never be read); expected
    is NaN on those rows."""
    alignment = get_m_alignment_for_contiguous_layout()
    segments = [[g] * size + [-1] * (align(size, alignment) - size) for g, size in enumerate(group_sizes)]
    m_indices = torch.tensor(sum(segments, []), dtype=torch.int32)
    x, w = randn(len(m_indices), k, seed=seed), randn(len(group_sizes), n, k, seed=seed + 1)
    x_fp8, scales = per_token_cast_to_fp8(x)
    padding = m_indices < 0
    x_fp8.view(torch.uint8)[padding] = FP8_NAN
    scales[padding] = float("nan")
    expected = torch.full((len(m_indices), n), float("nan"))
    for g in range(len(group_sizes)):
        rows = m_indices == g
        expected[rows] = x[rows] @ w[g].T
    return (x_fp8, scales), stacked_block_casts(w), m_indices, expected


def masked(num_groups: int, m_max: int, n: int, k: int, seed: int = 0):
    """(lhs, rhs, masked_m, expected): random masked_m in [0, m_max] (one group
    empty, one full); rows past masked_m hold NaN data and scales."""
    masked_m = torch.randint(0, m_max + 1, (num_groups,), generator=generator(seed), dtype=torch.int32)
    masked_m[0], masked_m[-1] = 0, m_max
    x, w = randn(num_groups, m_max, k, seed=seed), randn(num_groups, n, k, seed=seed + 1)
    x_fp8, scales = per_token_cast_to_fp8(x)
    padding = torch.arange(m_max)[None, :] >= masked_m[:, None]
    x_fp8.view(torch.uint8)[padding] = FP8_NAN
    scales[padding] = float("nan")
    expected = torch.einsum("gmk,gnk->gmn", x, w)
    expected[padding] = float("nan")
    return (x_fp8, scales), stacked_block_casts(w), masked_m, expected


def k_grouped(ks: list[int], m: int, n: int, seed: int = 0):
    """(a, b, c, expected) for the K-grouped GEMM: a [sum(ks), m] and b [sum(ks), n]
    cast per column over 128 rows of each group, c [groups, m, n], expected c + a_g.T @ b_g."""
    x, y = randn(sum(ks), m, seed=seed), randn(sum(ks), n, seed=seed + 1)
    c = randn(len(ks), m, n, seed=seed + 2)

    def cast(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        runs = [per_token_cast_to_fp8(run.T) for run in t.split(ks)]
        return torch.cat([r[0].T for r in runs]), torch.cat([r[1].T for r in runs])

    expected = torch.stack([c[g] + xg.T @ yg for g, (xg, yg) in enumerate(zip(x.split(ks), y.split(ks)))])
    return cast(x), cast(y), c, expected
