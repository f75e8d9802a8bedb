"""DeepGEMM's current GEMM API: the nt/nn/tn/tt layouts, accumulation, recipes with
FP4, finer granularities and packed UE8M0 scales, M-grouped contiguous (row indices,
prefix sums, other alignments) and masked, K-grouped (prefix sums, K-major), BF16
and cuBLASLt GEMMs, skip-head-mid; each against the reference or exact products."""

import pytest
import torch

from dsinfra import deep_gemm
from dsinfra.deep_gemm.operands import dequantised, operand
from dsinfra.testing import calc_diff, randn

from .data import call
from .test_gemm import CLOSE_TO_REFERENCE, DEEPGEMM_BOUND

EXACT = 1e-10  # float32 products of the same dequantised operands
BF16 = 1e-5  # DeepGEMM's bound for its BF16 GEMMs


def transposed(pair):
    """The operand of the transposed matrix, stored contiguously as a user holding it would."""
    return pair[0].T.contiguous(), pair[1].T.contiguous()


def matrices(m, n, k, seed):
    return randn(m, k, seed=seed), randn(n, k, seed=seed + 1)


@pytest.mark.parametrize("layout", ["nt", "nn", "tn", "tt"])
@pytest.mark.parametrize("implementation", ["reference", "torch", "triton"])
def test_fp8_layouts(implementation, kernel_device, layout):
    device = kernel_device if implementation == "triton" else "cpu"
    m, n, k = 37, 70, 300
    x, w = matrices(m, n, k, seed=1)
    a, b = deep_gemm.per_token_cast_to_fp8(x), deep_gemm.per_block_cast_to_fp8(w)
    expected = torch.empty(m, n, dtype=torch.bfloat16)
    call("reference", deep_gemm.fp8_gemm_nt, a, b, expected)
    a_in = a if layout[0] == "n" else transposed(a)
    b_in = b if layout[1] == "t" else transposed(b)
    out = torch.full((m, n), float("nan"), dtype=torch.bfloat16, device=device)
    moved = [tuple(t.to(device) for t in pair) for pair in (a_in, b_in)]
    call(implementation, getattr(deep_gemm, f"fp8_gemm_{layout}"), *moved, out)
    assert calc_diff(out.cpu().float(), expected.float()) < CLOSE_TO_REFERENCE
    assert calc_diff(out.cpu().float(), x @ w.T) < DEEPGEMM_BOUND


@pytest.mark.parametrize("layout", ["nt", "nn", "tn", "tt"])
def test_bf16_and_cublaslt_layouts(layout):
    m, n, k = 33, 65, 130
    x, w = (t.bfloat16() for t in matrices(m, n, k, seed=2))
    c = randn(m, n, seed=4)
    expected = x.float() @ w.float().T
    a_in = x if layout[0] == "n" else x.T.contiguous()
    b_in = w if layout[1] == "t" else w.T.contiguous()
    for implementation in ("reference", "torch"):
        out = torch.empty(m, n, dtype=torch.bfloat16)
        call(implementation, getattr(deep_gemm, f"bf16_gemm_{layout}"), a_in, b_in, out)
        assert calc_diff(out.float(), expected) < BF16
        accumulated = c.clone()
        call(implementation, getattr(deep_gemm, f"bf16_gemm_{layout}"), a_in, b_in, accumulated, c=accumulated)
        assert calc_diff(accumulated, expected + c) < 1e-12
    out = torch.empty(m, n, dtype=torch.float32)
    getattr(deep_gemm, f"cublaslt_gemm_{layout}")(a_in, b_in, out)
    assert calc_diff(out, expected) < 1e-12


def test_accumulation_and_degenerate_shapes():
    x, w = matrices(1, 40, 200, seed=5)
    a, b = deep_gemm.per_token_cast_to_fp8(x), deep_gemm.per_token_cast_to_fp8(w)
    c = randn(1, 40, seed=6).bfloat16()
    d = c.clone()
    deep_gemm.fp8_gemm_nt(a, b, d, c=d, recipe=(1, 1, 128))  # bf16 accumulation in place, m = 1
    assert calc_diff(d.float(), (x @ w.T + c.float())) < DEEPGEMM_BOUND
    empty_k = (torch.zeros(3, 0, dtype=torch.float8_e4m3fn), torch.zeros(3, 0)), (torch.zeros(4, 0, dtype=torch.float8_e4m3fn), torch.zeros(1, 0))
    c, d = randn(3, 4, seed=7), torch.full((3, 4), float("nan"))
    deep_gemm.fp8_gemm_nt(*empty_k, d, c=c)
    assert torch.equal(d, c)  # k = 0: d = c
    deep_gemm.fp8_gemm_nt(*empty_k, d)
    assert (d == 0).all()
    no_rows = torch.zeros(0, 8, dtype=torch.float8_e4m3fn), torch.zeros(0, 1)
    deep_gemm.fp8_gemm_nt(no_rows, (torch.zeros(4, 8, dtype=torch.float8_e4m3fn), torch.zeros(1, 1)), torch.empty(0, 4))


def test_fp4_and_fine_granularity_are_exact_products():
    m, n, k = 24, 40, 192
    x, w = matrices(m, n, k, seed=8)
    a = deep_gemm.per_token_cast_to_fp8(x, use_ue8m0=True, gran_k=32)
    b = deep_gemm.per_token_cast_to_fp4(w, use_ue8m0=True, gran_k=32)
    exact = dequantised(operand("a", a, (1, 32), False)) @ dequantised(operand("b", b, (1, 32), True)).T
    for implementation in ("reference", "torch"):
        d = torch.empty(m, n)
        call(implementation, deep_gemm.fp8_fp4_gemm_nt, a, b, d, recipe_a=(1, 32), recipe_b=(1, 32))
        assert calc_diff(d, exact) < EXACT and calc_diff(d, x @ w.T) < 0.01  # DeepGEMM's FP4 bound
    b_packed = deep_gemm.per_token_cast_to_fp4(w, use_ue8m0=True, gran_k=32, use_packed_ue8m0=True)
    b_mn_major = (deep_gemm.transpose_packed_fp4(b[0]).T, b_packed[1])  # FP4 packed along n, UE8M0 in int32s
    d = torch.empty(m, n)
    deep_gemm.fp8_fp4_gemm_nt(a, b_mn_major, d, recipe_a=(1, 32), recipe_b=(1, 32))
    assert calc_diff(d, exact) < EXACT


def test_packed_ue8m0_scales_give_the_float_result():
    x, w = matrices(20, 300, 260, seed=9)
    a = deep_gemm.per_token_cast_to_fp8(x, use_ue8m0=True)
    a_packed = deep_gemm.per_token_cast_to_fp8(x, use_ue8m0=True, use_packed_ue8m0=True)
    b = deep_gemm.per_block_cast_to_fp8(w, use_ue8m0=True)
    b_rows = (b[0], deep_gemm.get_mn_major_tma_aligned_packed_ue8m0_tensor(b[1].repeat_interleave(128, 0)[:300]))
    expected, out = torch.empty(20, 300, dtype=torch.bfloat16), torch.empty(20, 300, dtype=torch.bfloat16)
    deep_gemm.fp8_gemm_nt(a, b, expected)
    deep_gemm.fp8_gemm_nt(a_packed, b_rows, out, recipe=(1, 1, 128))
    assert torch.equal(out, expected)


def contiguous_case(sizes, n, k, seed, alignment=128):
    """(x [m, k], w [groups, n, k], m_indices, prefix-sum ends): sizes aligned to ``alignment``."""
    m_indices = sum(([g] * s + [-1] * (-s % alignment) for g, s in enumerate(sizes)), [])
    ends, start = [], 0
    for s in sizes:
        ends.append(start + s)
        start += s + (-s % alignment)
    x, w = randn(len(m_indices), k, seed=seed), randn(len(sizes), n, k, seed=seed + 1)
    return x, w, torch.tensor(m_indices, dtype=torch.int32), torch.tensor(ends, dtype=torch.int32)


def grouped_reference(x, w, m_indices):
    expected = torch.zeros(x.shape[0], w.shape[1])
    for g in range(w.shape[0]):
        rows = m_indices == g
        expected[rows] = x[rows] @ w[g].T
    return expected


@pytest.mark.parametrize("implementation", ["torch", "triton"])
def test_m_grouped_contiguous_layouts(implementation, kernel_device):
    device = kernel_device if implementation == "triton" else "cpu"
    x, w, m_indices, ends = contiguous_case([130, 0, 1], 72, 200, seed=10)
    a = tuple(t.to(device) for t in deep_gemm.per_token_cast_to_fp8(x))
    blocks = [deep_gemm.per_block_cast_to_fp8(w[g]) for g in range(w.shape[0])]
    b = torch.stack([p[0] for p in blocks]).to(device), torch.stack([p[1] for p in blocks]).to(device)
    expected = grouped_reference(x, w, m_indices)
    owned = m_indices >= 0
    for layout, psum in ((m_indices, False), (ends, True)):
        out = torch.full((len(m_indices), 72), 7.0, dtype=torch.bfloat16, device=device)
        call(implementation, deep_gemm.m_grouped_fp8_gemm_nt_contiguous, a, b, out, layout.to(device), use_psum_layout=psum)
        out = out.cpu().float()
        assert calc_diff(out[owned], expected[owned]) < DEEPGEMM_BOUND and (out[~owned] == 0).all()
    out = torch.full((len(m_indices), 72), 7.0, dtype=torch.bfloat16, device=device)
    b_nn = (b[0].transpose(1, 2).contiguous(), b[1].transpose(1, 2).contiguous())
    call(implementation, deep_gemm.m_grouped_fp8_gemm_nn_contiguous, a, b_nn, out, ends.to(device), use_psum_layout=True, ensure_zero_padding=False)
    out = out.cpu().float()
    assert calc_diff(out[owned], expected[owned]) < DEEPGEMM_BOUND and (out[~owned] == 7).all()  # padding left alone


def test_m_grouped_other_alignment_fp4_and_bf16():
    alignment = deep_gemm.get_mk_alignment_for_contiguous_layout()
    deep_gemm.set_mk_alignment_for_contiguous_layout(32)
    try:
        x, w, m_indices, ends = contiguous_case([40, 3, 0, 64], 48, 96, seed=11, alignment=32)
        expected = grouped_reference(x, w, m_indices)
        owned = m_indices >= 0
        a = deep_gemm.per_token_cast_to_fp8(x)
        fp4 = [deep_gemm.per_token_cast_to_fp4(w[g], use_ue8m0=True, gran_k=32) for g in range(w.shape[0])]
        cases = [
            (deep_gemm.m_grouped_fp8_gemm_nt_contiguous, a, deep_gemm.per_token_cast_to_fp8(w), {"recipe": (1, 1, 128)}, DEEPGEMM_BOUND),
            (deep_gemm.m_grouped_fp8_fp4_gemm_nt_contiguous, a, (torch.stack([p[0] for p in fp4]), torch.stack([p[1] for p in fp4])), {"recipe_a": (1, 128), "recipe_b": (1, 32)}, 0.01),
            (deep_gemm.m_grouped_bf16_gemm_nt_contiguous, x.bfloat16(), w.bfloat16(), {}, BF16),
        ]
        for function, a_in, b_in, kwargs, bound in cases:
            for implementation in ("reference", "torch"):
                for layout, psum in ((m_indices, False), (ends, True)):
                    out = torch.full((len(m_indices), 48), 7.0, dtype=torch.bfloat16)
                    call(implementation, function, a_in, b_in, out, layout, use_psum_layout=psum, **kwargs)
                    assert calc_diff(out.float()[owned], expected[owned]) < bound and (out[~owned] == 0).all()
    finally:
        deep_gemm.set_mk_alignment_for_contiguous_layout(alignment)


def test_masked_emulated_and_bf16():
    num_groups, m_max, n, k = 3, 20, 40, 64
    x, w = randn(num_groups, m_max, k, seed=12), randn(num_groups, n, k, seed=13)
    masked_m = torch.tensor([0, 20, 7], dtype=torch.int32)
    expected = torch.einsum("gmk,gnk->gmn", x, w)
    a = deep_gemm.per_token_cast_to_fp8(x, use_ue8m0=True, gran_k=32)
    b = deep_gemm.per_token_cast_to_fp4(w.flatten(0, 1), use_ue8m0=True, gran_k=32)
    b = (b[0].view(num_groups, n, -1), b[1].view(num_groups, n, -1))
    for function, a_in, b_in, kwargs, bound in [
        (deep_gemm.m_grouped_fp8_fp4_gemm_nt_masked, a, b, {"recipe_a": (1, 32), "recipe_b": (1, 32)}, 0.01),
        (deep_gemm.m_grouped_bf16_gemm_nt_masked, x.bfloat16(), w.bfloat16(), {}, BF16),
        (deep_gemm.bf16_m_grouped_gemm_nt_masked, x.bfloat16(), w.bfloat16(), {}, BF16),
    ]:
        out = torch.full((num_groups, m_max, n), 7.0, dtype=torch.bfloat16)
        function(a_in, b_in, out, masked_m, 10, **kwargs)
        for g, rows in enumerate(masked_m.tolist()):
            assert calc_diff(out[g, :rows].float(), expected[g, :rows]) < bound and (out[g, rows:] == 7).all()


def k_grouped_case(ks, m, n, seed, alignment=128, gran_k=128, gaps=False):
    """(a, b, c, expected, ends) with each group's rows cast per column over gran_k rows;
    with ``gaps`` the groups start at aligned rows (prefix-sum layout), gap rows NaN."""
    starts, ends, row = [], [], 0
    for k in ks:
        starts.append(row)
        ends.append(row + k)
        row = row + k + ((-(row + k)) % alignment if gaps else 0)
    total = ends[-1] if ks else 0
    x, y = torch.full((total, m), float("nan"), dtype=torch.float32), torch.full((total, n), float("nan"), dtype=torch.float32)
    values = [torch.zeros(total, m, dtype=torch.float8_e4m3fn), torch.zeros(total, n, dtype=torch.float8_e4m3fn)]
    scales = [[], []]
    c = randn(len(ks), m, n, seed=seed)
    expected = c.clone()
    for g, (start, k) in enumerate(zip(starts, ks)):
        xg, yg = randn(k, m, seed=seed + 2 * g + 1), randn(k, n, seed=seed + 2 * g + 2)
        x[start : start + k], y[start : start + k] = xg, yg
        expected[g] += xg.T @ yg
        for i, t in enumerate((xg, yg)):
            v, s = deep_gemm.per_channel_cast_to_fp8(torch.nn.functional.pad(t, (0, 0, 0, -k % gran_k)), gran_k=gran_k)
            values[i][start : start + k] = v[:k]
            scales[i].append(s)
    pairs = [(values[i], torch.cat(scales[i]) if scales[i] else torch.zeros(0, (m, n)[i], dtype=torch.float32)) for i in range(2)]
    return pairs[0], pairs[1], c, expected, torch.tensor(ends, dtype=torch.int32), (x, y)


@pytest.mark.parametrize("implementation", ["reference", "torch", "triton"])
def test_k_grouped_layouts(implementation, kernel_device):
    device = kernel_device if implementation == "triton" else "cpu"
    ks = [128, 0, 200]
    a, b, c, expected, ends, _ = k_grouped_case(ks, 24, 40, seed=14, gaps=True)
    moved = [tuple(t.to(device) for t in pair) for pair in (a, b)]
    for ks_cpu in (ks, None, []):
        d = c.clone().to(device)
        call(implementation, deep_gemm.k_grouped_fp8_gemm_tn_contiguous, *moved, d, ks_cpu, ends.to(device), d, use_psum_layout=True)
        assert calc_diff(d.cpu(), expected) < DEEPGEMM_BOUND


def test_k_grouped_fine_granularity_k_major_and_bf16():
    ks = [64, 0, 96]
    a, b, c, expected, ends, (x, y) = k_grouped_case(ks, 24, 40, seed=15, gran_k=32)
    d = torch.empty_like(c)
    deep_gemm.k_grouped_fp8_gemm_tn_contiguous(a, b, d, ks, ends * 0 + torch.tensor(ks, dtype=torch.int32), c, recipe=(1, 1, 32))
    assert calc_diff(d, expected) < DEEPGEMM_BOUND
    d = torch.empty_like(c)
    deep_gemm.k_grouped_bf16_gemm_tn_contiguous(x.bfloat16(), y.bfloat16(), d, ks, None, c)
    assert calc_diff(d, expected) < BF16
    # K-major groups: each group's [m, k] block row-major after the previous ones, 1x128 scales per row
    ks = [128, 0, 100]
    a, b, c, expected, _, _ = k_grouped_case(ks, 24, 40, seed=16)
    flat = [torch.cat([t[0][s : s + k].T.contiguous().flatten() for s, k in zip([0, 128, 128], ks)]) for t in (a, b)]
    d = torch.empty_like(c)
    deep_gemm.k_grouped_fp8_gemm_nt_contiguous((flat[0], a[1].T), (flat[1], b[1].T), d, ks, None, c)
    assert calc_diff(d, expected) < DEEPGEMM_BOUND
    with pytest.raises(ValueError, match="use_psum_layout is not available"):
        deep_gemm.k_grouped_fp8_gemm_nt_contiguous((flat[0], a[1].T), (flat[1], b[1].T), d, ks, None, c, use_psum_layout=True)


def test_skip_head_mid():
    x, w = matrices(5, 2 * 96, 128, seed=17)  # two heads of left 64 + right 32, a gap of 16 in between
    d = torch.full((5, 2 * (64 + 16 + 32)), 7.0, dtype=torch.bfloat16)
    deep_gemm.fp8_gemm_nt_skip_head_mid(deep_gemm.per_token_cast_to_fp8(x), deep_gemm.per_block_cast_to_fp8(w), d, (64, 16, 32))
    heads, full = d.view(5, 2, 112).float(), (x @ w.T).view(5, 2, 96)
    assert (heads[:, :, 64:80] == 7).all()
    assert calc_diff(torch.cat((heads[:, :, :64], heads[:, :, 80:]), 2), full) < DEEPGEMM_BOUND
    with pytest.raises(ValueError, match="multiple of left \\+ right"):
        deep_gemm.fp8_gemm_nt_skip_head_mid(deep_gemm.per_token_cast_to_fp8(x), deep_gemm.per_block_cast_to_fp8(w), d, (64, 16, 64))


def test_default_dtype_does_not_matter():
    """The same calls under a bfloat16 default dtype give the same bits."""

    def run():
        x, w = matrices(20, 36, 96, seed=18)
        a4 = deep_gemm.per_token_cast_to_fp4(w, use_ue8m0=True, gran_k=32)
        outs = [torch.empty(20, 36, dtype=torch.float32), torch.empty(20, 36, dtype=torch.bfloat16), torch.empty(20, 36, dtype=torch.float32)]
        deep_gemm.fp8_fp4_gemm_nt(deep_gemm.per_token_cast_to_fp8(x, True, 32), a4, outs[0], recipe_a=(1, 32), recipe_b=(1, 32))
        deep_gemm.fp8_gemm_tn(transposed(deep_gemm.per_token_cast_to_fp8(x)), transposed(deep_gemm.per_block_cast_to_fp8(w)), outs[1])
        deep_gemm.bf16_gemm_nt(x.bfloat16(), w.bfloat16(), outs[2])
        ks = [32, 64]
        a, b, c, _, ends, _ = k_grouped_case(ks, 8, 12, seed=19, gaps=True)
        deep_gemm.k_grouped_fp8_gemm_tn_contiguous(a, b, c, None, ends, c, use_psum_layout=True)
        packed = deep_gemm.get_mn_major_tma_aligned_packed_ue8m0_tensor(deep_gemm.per_token_cast_to_fp8(x, True)[1])
        return outs + [c, packed, deep_gemm.per_channel_cast_to_fp8(x, True)[1]]

    before = run()
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        after = run()
    finally:
        torch.set_default_dtype(default)
    assert [i for i, (u, v) in enumerate(zip(before, after)) if u.dtype != v.dtype or not torch.equal(u, v)] == []


def test_legacy_gathers():
    x, w, m_indices, _ = contiguous_case([40, 3], 24, 32, seed=20)
    order = torch.randperm(len(m_indices), generator=torch.Generator().manual_seed(0)).to(torch.int32)
    stored = torch.empty_like(x)
    stored[order.long()] = x  # a's rows kept elsewhere: row r of the layout is stored[order[r]]
    d = torch.empty(len(m_indices), 24, dtype=torch.bfloat16)
    deep_gemm.legacy.a_fused_m_grouped_bf16_gemm_nt_contiguous_tl(stored.bfloat16(), w.bfloat16(), d, (m_indices, order))
    owned = m_indices >= 0
    assert calc_diff(d.float()[owned], grouped_reference(x, w, m_indices)[owned]) < BF16
    ks, m, n = [64, 0, 32], 8, 12
    a, b = randn(96, m, seed=21), randn(96, n, seed=22)
    k_indices = torch.randperm(96, generator=torch.Generator().manual_seed(1)).to(torch.int32)
    stored = torch.empty_like(a)
    stored[k_indices.long()] = a
    c = randn(3, m, n, seed=23)
    expected = c + torch.stack([a[s : s + k].T @ b[s : s + k] for s, k in zip([0, 64, 64], ks)])
    handle = (k_indices, torch.tensor([0, 64, 64], dtype=torch.int32), torch.tensor([64, 64, 96], dtype=torch.int32))
    deep_gemm.legacy.a_fused_k_grouped_bf16_gemm_tn_contiguous_tl(stored.bfloat16(), b.bfloat16(), c, handle, True)
    assert calc_diff(c, expected) < BF16


def test_mega_moe_is_refused_by_name():
    with pytest.raises(AttributeError, match="does not provide fp8_fp4_mega_moe: DeepGEMM's Mega MoE"):
        deep_gemm.fp8_fp4_mega_moe
