import math

import pytest
import torch

from dsinfra.testing import calc_diff, randn, seq_lengths, skewed_loads, topk_indices


def test_calc_diff_values():
    x = torch.randn(100, dtype=torch.float64)
    assert calc_diff(x, x) == pytest.approx(0.0, abs=1e-15)
    assert calc_diff(x, -x) == pytest.approx(2.0)
    assert calc_diff(x, 1.01 * x) == pytest.approx(1 - 2 * 1.01 / (1 + 1.01**2))
    assert calc_diff(torch.zeros(3), torch.zeros(3)) == 0.0
    assert calc_diff(torch.empty(0), torch.empty(0)) == 0.0
    assert math.isnan(calc_diff(torch.tensor([1.0, float("nan")]), torch.tensor([1.0, 2.0])))
    with pytest.raises(ValueError, match="one shape"):
        calc_diff(torch.zeros(3), torch.zeros(4))


def test_calc_diff_is_computed_in_float64():
    x = torch.randn(1000).to(torch.bfloat16)
    assert calc_diff(x, x) == 0.0


def test_generators_are_seeded():
    assert torch.equal(randn(3, 4, seed=1), randn(3, 4, seed=1))
    assert not torch.equal(randn(3, 4, seed=1), randn(3, 4, seed=2))
    assert randn(2, seed=0, dtype=torch.bfloat16).dtype == torch.bfloat16


def test_seq_lengths():
    fixed = seq_lengths(4, 100, seed=0, varlen=False)
    assert fixed.dtype == torch.int32 and fixed.tolist() == [100] * 4
    varied = seq_lengths(64, 100, seed=0)
    assert varied.min() >= 1 and len(set(varied.tolist())) > 10


def test_topk_indices():
    idx = topk_indices(200, 16, 4, seed=0, skew=1.5, drop=0.1)
    assert idx.shape == (200, 4) and idx.dtype == torch.int64
    assert ((idx >= -1) & (idx < 16)).all()
    assert (idx == -1).any()
    for row in idx.tolist():
        chosen = [e for e in row if e >= 0]
        assert len(chosen) == len(set(chosen))
    counts = torch.bincount(idx[idx >= 0], minlength=16)
    assert counts[0] > counts[15]
    assert topk_indices(0, 16, 4, seed=0).shape == (0, 4)


def test_skewed_loads():
    loads = skewed_loads(3, 32, seed=0, skew=1.0)
    assert loads.shape == (3, 32) and (loads > 0).all()
    assert loads.max() / loads.mean() > 3
