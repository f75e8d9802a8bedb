"""Comparisons of FlashMLA results against the reference's."""

from __future__ import annotations

import math

import torch

from dsinfra.testing import calc_diff

BOUND = 1e-5  # FlashMLA's bound on calc_diff (cos-diff) for out and lse


def assert_matches(out, lse, expected_out, expected_lse, *, bound=BOUND):
    """Decoding results (out [b, s_q, h_q, d_v], lse [b, h_q, s_q]) against the reference's."""
    out, lse = out.cpu(), lse.cpu()
    assert out.shape == expected_out.shape and out.dtype == expected_out.dtype
    assert lse.shape == expected_lse.shape and lse.dtype == torch.float32
    assert not out.isnan().any() and not lse.isnan().any()
    empty = expected_lse == math.inf
    assert torch.equal(lse == math.inf, empty), "queries that see nothing must get lse = +inf"
    assert (out.transpose(1, 2)[empty] == 0).all(), "queries that see nothing must get out = 0"
    assert calc_diff(out.float(), expected_out.float()) < bound
    assert calc_diff(lse[~empty], expected_lse[~empty]) < bound


def assert_same_specials(result, expected):
    """The same positions hold +inf, -inf and NaN in both tensors."""
    for special in (lambda x: x == math.inf, lambda x: x == -math.inf, torch.isnan):
        assert torch.equal(special(result.cpu().float()), special(expected.float()))
