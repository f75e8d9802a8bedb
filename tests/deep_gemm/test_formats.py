"""Scale formats and casts under DeepGEMM's names: UE8M0 rounding and packing, FP4
(E2M1) codes, the casts' granularities, and the MN-major (packed) scale layouts."""

import pytest
import torch

from dsinfra import deep_gemm
from dsinfra.deep_gemm.fp4 import fp4_to_float
from dsinfra.testing import randn

FP4_VALUES = torch.tensor([0, 0.5, 1, 1.5, 2, 3, 4, 6], dtype=torch.float32)


def is_power_of_two(x):
    bits = x.view(torch.int32)
    return bool(((bits & 0x7FFFFF) == 0).all() and (bits > 0).all())


def test_ue8m0_rounds_up_and_packs_exactly():
    x = torch.tensor([1.0, 1.5, 0.3, 2.0**-130, 0.0, 3e38, -4.0], dtype=torch.float32)
    assert deep_gemm.ceil_to_ue8m0(x).tolist() == [1.0, 2.0, 0.5, 2.0**-126, 2.0**-126, 2.0**127, 4.0]
    scales = deep_gemm.ceil_to_ue8m0(randn(5, 8, seed=1).abs())
    packed = deep_gemm.pack_ue8m0_to_int(scales)
    assert packed.dtype == torch.int32 and packed.shape == (5, 2)
    assert torch.equal(deep_gemm.unpack_ue8m0_from_int(packed), scales)
    assert (packed[0, 0] & 0xFF).item() == scales[0, 0].view(torch.int32).item() >> 23  # first scale, lowest byte
    with pytest.raises(ValueError, match="powers of two"):
        deep_gemm.pack_ue8m0_to_int(torch.full((1, 4), 1.5))
    with pytest.raises(ValueError, match="multiple of 4"):
        deep_gemm.pack_ue8m0_to_int(torch.ones(1, 3))


@pytest.mark.parametrize("gran_k", [32, 128])
def test_fp4_cast_round_trip(gran_k):
    x = randn(6, 200, seed=2)
    packed, scales = deep_gemm.per_token_cast_to_fp4(x, use_ue8m0=True, gran_k=gran_k)
    assert packed.dtype == torch.int8 and packed.shape == (6, 100) and scales.shape == (6, -(-200 // gran_k))
    values = fp4_to_float(packed)
    assert torch.isin(values.abs(), FP4_VALUES).all() and is_power_of_two(scales)
    back = deep_gemm.cast_back_from_fp4(packed, scales, gran_k)
    assert ((back - x).abs() <= scales.repeat_interleave(gran_k, 1)[:, :200] * 1.0 + 1e-6).all()  # half an FP4 step at most
    ints = deep_gemm.per_token_cast_to_fp4(x, use_ue8m0=True, gran_k=gran_k, use_packed_ue8m0=True)
    assert torch.equal(ints[0], packed) and torch.equal(deep_gemm.cast_back_from_fp4(*ints, gran_k, use_packed_ue8m0=True), back)
    ties = torch.tensor([[0.25, 0.75, 2.5, 5.0, 6.0, -1.25, 1.75, -0.1]], dtype=torch.float32)  # amax 6: scale 1
    rounded = fp4_to_float(deep_gemm.per_token_cast_to_fp4(ties, gran_k=8)[0])
    assert rounded.tolist() == [[0, 0.5, 2, 4, 6, -1, 1.5, 0]]  # halfway values round toward zero


def test_fp4_transpose():
    packed, _ = deep_gemm.per_token_cast_to_fp4(randn(4, 6, seed=3))
    transposed = deep_gemm.transpose_packed_fp4(packed)
    assert transposed.shape == (6, 2) and torch.equal(fp4_to_float(transposed), fp4_to_float(packed).T)
    assert torch.equal(deep_gemm.transpose_packed_fp4(transposed), packed)


def test_fp8_casts_with_ue8m0_and_granularity():
    x = randn(70, 300, seed=4)
    values, scales = deep_gemm.per_token_cast_to_fp8(x, use_ue8m0=True, gran_k=32)
    assert scales.shape == (70, 10) and is_power_of_two(scales)
    back = values.float() * scales.repeat_interleave(32, 1)[:, :300]
    assert ((back - x).abs() <= x.abs() / 8 + scales.repeat_interleave(32, 1)[:, :300] * 2**-9).all()
    ints = deep_gemm.per_token_cast_to_fp8(x, use_ue8m0=True, gran_k=32, use_packed_ue8m0=True)
    assert torch.equal(ints[0], values) and torch.equal(deep_gemm.unpack_ue8m0_from_int(ints[1])[:, :10], scales)
    channel, channel_scales = deep_gemm.per_channel_cast_to_fp8(x, use_ue8m0=False, gran_k=32)
    assert channel_scales.shape == (3, 300)
    assert torch.equal(channel.float(), deep_gemm.per_token_cast_to_fp8(x.T.contiguous(), False, 32)[0].float().T)
    block, block_scales = deep_gemm.per_block_cast_to_fp8(x, use_ue8m0=True)
    assert block_scales.shape == (1, 3) and is_power_of_two(block_scales)
    keys, key_scales = deep_gemm.per_custom_dims_cast_to_fp8(x, (0,), False)
    assert key_scales.shape == (70,) and torch.allclose(key_scales, x.abs().amax(1) / 448)
    with pytest.raises(ValueError, match="use_packed_ue8m0 needs use_ue8m0"):
        deep_gemm.per_token_cast_to_fp8(x, use_packed_ue8m0=True)


def test_packed_ue8m0_layouts():
    scales = deep_gemm.ceil_to_ue8m0(randn(2, 13, 7, seed=5).abs())
    packed = deep_gemm.get_mn_major_tma_aligned_packed_ue8m0_tensor(scales)
    assert packed.shape == (2, 13, 2) and packed.stride() == (2 * 16, 1, 16)  # 13 rows padded to 16, MN-major
    unpacked = deep_gemm.unpack_ue8m0_from_int(packed.contiguous())
    assert torch.equal(unpacked[..., :7], scales) and (unpacked[..., 7:] == 0).all()
    assert torch.equal(deep_gemm.get_mn_major_tma_aligned_packed_ue8m0_tensor(scales[0]), packed[0])

    ks = [256, 0, 96]  # scale rows per group of 32: 8, 0, 3
    rows = deep_gemm.ceil_to_ue8m0(randn(11, 5, seed=6).abs())
    grouped = deep_gemm.get_k_grouped_mn_major_tma_aligned_packed_ue8m0_tensor(rows, torch.tensor(ks, dtype=torch.int32), ks, 32, 32)
    assert grouped.shape == (3, 5)  # 2 + 0 + 1 words per column
    assert torch.equal(deep_gemm.unpack_ue8m0_from_int(grouped[:2].T.contiguous()).T, rows[:8])
    assert torch.equal(deep_gemm.unpack_ue8m0_from_int(grouped[2:].T.contiguous()).T[:3], rows[8:])
    ends = torch.tensor([256, 256, 352], dtype=torch.int32)  # the same groups as prefix sums
    assert torch.equal(deep_gemm.get_k_grouped_mn_major_tma_aligned_packed_ue8m0_tensor(rows, ends, None, 32, 32, True), grouped)


def test_transform_sf_into_required_layout():
    per_row = randn(50, 3, seed=7)
    aligned = deep_gemm.transform_sf_into_required_layout(per_row, 50, 300, (1, 128, 128), is_sfa=True)
    assert torch.equal(aligned, per_row) and aligned.stride() == (1, 52)
    blocks = randn(1, 3, seed=8)
    assert deep_gemm.transform_sf_into_required_layout(blocks, 50, 300, (128, 128)) is blocks
    with pytest.raises(ValueError, match=r"sf must have shape \[50, 3\]"):
        deep_gemm.transform_sf_into_required_layout(blocks, 50, 300, (1, 128))
    with pytest.raises(ValueError, match="is_sfa must say"):
        deep_gemm.transform_sf_into_required_layout(per_row, 50, 300, (1, 128, 128))


def test_runtime_settings():
    alignment = deep_gemm.get_mk_alignment_for_contiguous_layout()
    try:
        deep_gemm.set_mk_alignment_for_contiguous_layout(64)
        assert deep_gemm.get_mk_alignment_for_contiguous_layout() == deep_gemm.get_k_alignment_for_contiguous_layout() == 64
        with pytest.raises(ValueError, match="multiple of 16"):
            deep_gemm.set_mk_alignment_for_contiguous_layout(20)
    finally:
        deep_gemm.set_mk_alignment_for_contiguous_layout(alignment)
    assert deep_gemm.get_theoretical_mk_alignment_for_contiguous_layout(300) == 128
    tc_util, pdl = deep_gemm.get_tc_util(), deep_gemm.get_pdl()
    try:
        deep_gemm.set_tc_util(80)
        deep_gemm.set_pdl(True)
        assert (deep_gemm.get_tc_util(), deep_gemm.get_pdl()) == (80, True)
        with pytest.raises(ValueError, match="tc_util must be a percentage"):
            deep_gemm.set_tc_util(101)
    finally:
        deep_gemm.set_tc_util(tc_util)
        deep_gemm.set_pdl(pdl)
    deep_gemm.set_ignore_compile_dims(True)
    deep_gemm.set_block_size_multiple_of((64, 32))
    with pytest.raises(TypeError, match="value must be a bool"):
        deep_gemm.set_ignore_compile_dims(1)


def test_testing_helpers():
    x = randn(3, 4, seed=9)
    deep_gemm.testing.assert_bitwise_equal(x, x.clone())
    with pytest.raises(AssertionError, match="bitwise mismatch"):
        deep_gemm.testing.assert_bitwise_equal(x, x + 1)
    assert deep_gemm.testing.count_bytes(x, (x.bfloat16(), None)) == 48 + 24
    assert deep_gemm.bench_kineto(lambda: None, ("a", "b"), num_tests=2)[0] >= 0
