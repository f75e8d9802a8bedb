"""The grouped GEMMs: contiguous (uneven and empty groups, -1 padding rows),
masked (random masked_m, 0 included) and K-grouped (empty and unaligned groups),
each implementation against the reference; padding holds NaN and must never be read."""

import pytest
import torch

from dsinfra import deep_gemm
from dsinfra.testing import calc_diff

from . import data
from .data import call, to
from .test_gemm import CLOSE_TO_REFERENCE, DEEPGEMM_BOUND

IMPLEMENTATIONS = ["reference", "torch", "triton"]
UNTOUCHED = -7.0  # what outputs hold before a call: rows left alone must still hold it


def device_for(implementation, kernel_device):
    return kernel_device if implementation == "triton" else "cpu"


def run_contiguous(implementation, lhs, rhs, m_indices, device):
    out = torch.full((len(m_indices), rhs[0].shape[1]), UNTOUCHED, dtype=torch.bfloat16, device=device)
    lhs, rhs = tuple(to(device, *lhs)), tuple(to(device, *rhs))
    call(implementation, deep_gemm.m_grouped_fp8_gemm_nt_contiguous, lhs, rhs, out, m_indices.to(device))
    return out.cpu().float()


# (group sizes, n, k): DeepGEMM's (n, k) pairs over 32, with uneven and empty groups
CONTIGUOUS_CASES = [([130, 0, 200, 1], 128, 224), ([256, 5], 224, 64), ([0, 0, 64], 256, 448)]


@pytest.mark.parametrize("sizes,n,k", CONTIGUOUS_CASES)
@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_contiguous(implementation, kernel_device, sizes, n, k):
    lhs, rhs, m_indices, expected = data.contiguous(sizes, n, k, seed=len(sizes))
    out = run_contiguous(implementation, lhs, rhs, m_indices, device_for(implementation, kernel_device))
    padding = m_indices < 0
    assert (out[padding] == 0).all()  # -1 rows are written as zeros, their NaN data never read
    assert calc_diff(out[~padding], expected[~padding]) < DEEPGEMM_BOUND
    if implementation != "reference":
        reference = run_contiguous("reference", lhs, rhs, m_indices, "cpu")
        assert calc_diff(out[~padding], reference[~padding]) < CLOSE_TO_REFERENCE


def run_masked(implementation, lhs, rhs, masked_m, expected_m, device):
    num_groups, m_max, _ = lhs[0].shape
    out = torch.full((num_groups, m_max, rhs[0].shape[1]), UNTOUCHED, dtype=torch.bfloat16, device=device)
    lhs, rhs = tuple(to(device, *lhs)), tuple(to(device, *rhs))
    call(implementation, deep_gemm.m_grouped_fp8_gemm_nt_masked, lhs, rhs, out, masked_m.to(device), expected_m)
    return out.cpu().float()


@pytest.mark.parametrize("num_groups,m_max,n,k,seed", [(4, 96, 128, 224, 0), (3, 200, 160, 64, 1)])
@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_masked(implementation, kernel_device, num_groups, m_max, n, k, seed):
    lhs, rhs, masked_m, expected = data.masked(num_groups, m_max, n, k, seed=seed)
    expected_m = max(1, int(masked_m.float().mean()))
    out = run_masked(implementation, lhs, rhs, masked_m, expected_m, device_for(implementation, kernel_device))
    padding = expected.isnan()
    assert (out[padding] == UNTOUCHED).all()  # rows past masked_m are left alone
    assert calc_diff(out[~padding], expected[~padding]) < DEEPGEMM_BOUND
    if implementation != "reference":
        reference = run_masked("reference", lhs, rhs, masked_m, expected_m, "cpu")
        assert calc_diff(out[~padding], reference[~padding]) < CLOSE_TO_REFERENCE


def run_k_grouped(implementation, a, b, ks, c, device):
    num_groups, m, n = len(ks), a[0].shape[1], b[0].shape[1]
    d = torch.full((num_groups, m, n), float("nan"), device=device)
    ks_tensor = torch.tensor(ks, dtype=torch.int32, device=device)
    c = None if c is None else c.to(device)
    a, b = tuple(to(device, *a)), tuple(to(device, *b))
    call(implementation, deep_gemm.k_grouped_fp8_gemm_tn_contiguous, a, b, d, ks, ks_tensor, c)
    return d.cpu()


# (ks, m, n): DeepGEMM's EP shapes scaled down, with empty and unaligned groups
K_GROUPED_CASES = [([256, 0, 384, 128], 64, 96), ([100, 16, 0], 48, 136), ([0], 32, 32)]


@pytest.mark.parametrize("ks,m,n", K_GROUPED_CASES)
@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_k_grouped(implementation, kernel_device, ks, m, n):
    a, b, c, expected = data.k_grouped(ks, m, n, seed=len(ks))
    device = device_for(implementation, kernel_device)
    accumulated = run_k_grouped(implementation, a, b, ks, c, device)
    assert calc_diff(accumulated, expected) < DEEPGEMM_BOUND
    fresh = run_k_grouped(implementation, a, b, ks, None, device)
    assert calc_diff(fresh, expected - c) < DEEPGEMM_BOUND
    assert (fresh[[g for g, k in enumerate(ks) if k == 0]] == 0).all()  # empty groups give zeros
    if implementation != "reference":
        assert calc_diff(accumulated, run_k_grouped("reference", a, b, ks, c, "cpu")) < CLOSE_TO_REFERENCE


@pytest.mark.gpu
def test_cuda_grouped_match_reference():
    lhs, rhs, m_indices, expected = data.contiguous([1000, 0, 3000, 129], 2048, 1024)
    out = run_contiguous("auto", lhs, rhs, m_indices, "cuda")
    valid = m_indices >= 0
    assert calc_diff(out[valid], run_contiguous("reference", lhs, rhs, m_indices, "cpu")[valid]) < CLOSE_TO_REFERENCE
    lhs, rhs, masked_m, expected = data.masked(4, 256, 2048, 1024)
    out = run_masked("auto", lhs, rhs, masked_m, 128, "cuda")
    valid = ~expected.isnan()
    assert calc_diff(out[valid], run_masked("reference", lhs, rhs, masked_m, 128, "cpu")[valid]) < CLOSE_TO_REFERENCE
    a, b, c, expected = data.k_grouped([1024, 0, 384, 2048], 512, 1024)
    assert calc_diff(run_k_grouped("auto", a, b, [1024, 0, 384, 2048], c, "cuda"), expected) < DEEPGEMM_BOUND
