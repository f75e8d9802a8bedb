"""Bad input gets a TypeError or ValueError that names the argument."""

import pytest
import torch

from dsinfra import deep_gemm

from . import data


def fp8(*shape):
    return torch.zeros(*shape).to(torch.float8_e4m3fn)


def test_dense_errors():
    a, b, _ = data.dense(8, 256, 256)
    out = torch.empty(8, 256, dtype=torch.bfloat16)
    cases = [
        ((a[0].float(), a[1]), b, out, {}, TypeError, r"a\[0\] must have dtype float8_e4m3fn"),
        ((a[0], a[1].double()), b, out, {}, TypeError, r"a\[1\] must have dtype float32"),
        (a[0], b, out, {}, TypeError, r"a must be a pair"),
        ((a[0], a[1][:, :1]), b, out, {}, ValueError, r"a\[1\] must have shape \[8, 2\]"),
        (a, (fp8(256, 128), b[1][:, :1]), out, {}, ValueError, r"a and b must have the same k; got 256 and 128"),
        (a, (b[0], b[1][:1]), out, {}, ValueError, r"b\[1\] must have shape \[2, 2\]"),
        (a, b, out, {"recipe": (1, 1, 128)}, ValueError, r"b\[1\] must have shape \[256, 2\]"),
        (a, b, out, {"recipe": (1, 64, 128)}, ValueError, r"b\[1\] must have shape \[4, 2\]"),
        (a, b, out, {"recipe": (1, 0, 128)}, ValueError, r"recipe entries must be > 0"),
        (a, b, out, {"recipe": (1, 128, 128), "recipe_a": (1, 128)}, ValueError, r"either recipe or recipe_a and recipe_b"),
        (a, b, out, {"recipe_a": (1, 128)}, ValueError, r"recipe_a and recipe_b come together"),
        (a, b, out, {"compiled_dims": 1}, TypeError, r"compiled_dims must be a str"),
        (a, b, out.float()[:, :7], {}, ValueError, r"d must have shape \[8, 256\]"),
        (a, b, out.half(), {}, TypeError, r"d must have dtype bfloat16 or float32"),
        (a, b, out, {"c": torch.zeros(8, 256)}, TypeError, r"c must have dtype bfloat16"),
        (a, b, out.float(), {"c": torch.zeros(8, 256, dtype=torch.bfloat16)}, TypeError, r"c must have dtype float32"),
    ]
    for lhs, rhs, d, kwargs, error, message in cases:
        with pytest.raises(error, match=message):
            deep_gemm.fp8_gemm_nt(lhs, rhs, d, **kwargs)
    with pytest.raises(TypeError, match=r"out must have dtype bfloat16"):
        deep_gemm.gemm_fp8_fp8_bf16_nt(a, b, out.float())
    with pytest.raises(ValueError, match=r"rhs\[1\] must have shape \[2, 2\]"):
        deep_gemm.gemm_fp8_fp8_bf16_nt(a, deep_gemm.per_token_cast_to_fp8(torch.randn(256, 256)), out)


def test_contiguous_errors():
    lhs, rhs, m_indices, _ = data.contiguous([100, 28], 128, 128)
    out = torch.empty(len(m_indices), 128, dtype=torch.bfloat16)
    call = deep_gemm.m_grouped_gemm_fp8_fp8_bf16_nt_contiguous
    with pytest.raises(TypeError, match=r"m_indices must have dtype int32"):
        call(lhs, rhs, out, m_indices.long())
    with pytest.raises(ValueError, match=r"m_indices must have shape \[256\]"):
        call(lhs, rhs, out, m_indices[:10])
    with pytest.raises(ValueError, match=r"m_indices must hold values in \[0, 2\) or -1; found 2"):
        call(lhs, rhs, out, torch.where(m_indices == 1, 2, m_indices))
    with pytest.raises(ValueError, match=r"m_indices must hold values in \[0, 2\) or -1; found -2"):
        call(lhs, rhs, out, torch.where(m_indices == -1, -2, m_indices))
    unaligned = m_indices.clone()
    unaligned[127] = 1  # row 127 belongs to the first aligned block, which group 0 holds
    with pytest.raises(ValueError, match=r"rows 0..127 mix groups 0 and 1"):
        call(lhs, rhs, out, unaligned)
    with pytest.raises(ValueError, match=r"rhs\[1\] must have shape \[2, 1, 1\]"):
        call(lhs, (rhs[0], rhs[1][:, :, :0]), out, m_indices)
    with pytest.raises(TypeError, match=r"out must have dtype bfloat16"):
        call(lhs, rhs, out.float(), m_indices)


def test_masked_errors():
    lhs, rhs, masked_m, _ = data.masked(2, 64, 128, 128)
    out = torch.empty(2, 64, 128, dtype=torch.bfloat16)
    call = deep_gemm.m_grouped_gemm_fp8_fp8_bf16_nt_masked
    with pytest.raises(ValueError, match=r"masked_m must hold values in \[0, 65\); found 65"):
        call(lhs, rhs, out, torch.tensor([65, 0], dtype=torch.int32), 32)
    with pytest.raises(ValueError, match=r"masked_m must have shape \[2\]"):
        call(lhs, rhs, out, masked_m[:1], 32)
    with pytest.raises(ValueError, match=r"expected_m must be > 0"):
        call(lhs, rhs, out, masked_m, 0)
    with pytest.raises(ValueError, match=r"lhs\[0\] and rhs\[0\] must have 3 dimensions and the same number of groups"):
        call(lhs, (rhs[0][:1], rhs[1][:1]), out, masked_m, 32)
    with pytest.raises(ValueError, match=r"out must have shape \[2, 64, 128\]"):
        call(lhs, rhs, out[:, :10], masked_m, 32)


def test_k_grouped_errors():
    ks = [128, 100]
    a, b, _, _ = data.k_grouped(ks, 32, 48)
    d = torch.empty(2, 32, 48)
    call = deep_gemm.k_grouped_fp8_gemm_tn_contiguous
    with pytest.raises(ValueError, match=r"ks_cpu must be sizes >= 0 that add up to a\[0\].shape\[0\] \(228\)"):
        call(a, b, d, [128, 99])
    with pytest.raises(TypeError, match=r"ks_cpu must be a sequence of ints"):
        call(a, b, d, [128.0, 100])
    with pytest.raises(ValueError, match=r"a\[1\] must have shape \[2, 32\]"):
        call((a[0], a[1][:1]), b, d, ks)
    with pytest.raises(ValueError, match=r"grouped_layout must hold ks_cpu"):
        call(a, b, d, ks, torch.tensor([100, 128], dtype=torch.int32))
    with pytest.raises(TypeError, match=r"d must have dtype float32"):
        call(a, b, d.bfloat16(), ks)
    with pytest.raises(ValueError, match=r"c must have shape \[2, 32, 48\]"):
        call(a, b, d, ks, c=torch.zeros(2, 32, 47))
