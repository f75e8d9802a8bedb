"""The FP8 KV cache: upstream's 656-byte layout, and the same rule for smaller heads."""

import pytest
import torch

from dsinfra.flash_mla import dequantize_k_cache, quantize_k_cache
from dsinfra.flash_mla.fp8_cache import bytes_per_token
from dsinfra.testing import calc_diff, randn


def test_deepseek_layout_is_656_bytes():
    k_cache = randn(3, 64, 1, 576, seed=0, dtype=torch.bfloat16)
    k_cache[0, 0, 0, :128] *= 100  # a group with its own, larger scale
    fp8 = quantize_k_cache(k_cache, 512)
    assert fp8.dtype == torch.float8_e4m3fn and fp8.shape == (3, 64, 1, 656) and fp8.is_contiguous()
    token = fp8[0, 0, 0].view(torch.uint8)
    nope = token[:512].view(torch.float8_e4m3fn).float()
    scales = token[512:528].view(torch.float32)
    rope = token[528:].view(torch.bfloat16)
    assert torch.equal(rope, k_cache[0, 0, 0, 512:])
    amax = k_cache[0, 0, 0, :512].float().abs().view(4, 128).amax(dim=1)
    torch.testing.assert_close(scales, amax / 448)
    assert scales[0] > 50 * scales[1]
    value = nope * scales.repeat_interleave(128)
    assert calc_diff(value, k_cache[0, 0, 0, :512].float()) < 1e-3


@pytest.mark.parametrize("head_dim, head_dim_v, expected_bytes", [(576, 512, 656), (160, 128, 196), (64, 64, 68), (192, 128, 260)])
def test_round_trip(head_dim, head_dim_v, expected_bytes):
    assert bytes_per_token(head_dim, head_dim_v) == expected_bytes
    k_cache = randn(2, 16, 2, head_dim, seed=1, dtype=torch.bfloat16)
    fp8 = quantize_k_cache(k_cache, head_dim_v)
    assert fp8.shape == (2, 16, 2, expected_bytes)
    back = dequantize_k_cache(fp8, head_dim, head_dim_v)
    assert back.dtype == torch.bfloat16 and back.shape == k_cache.shape
    assert torch.equal(back[..., head_dim_v:], k_cache[..., head_dim_v:])  # RoPE kept exactly
    assert calc_diff(back.float(), k_cache.float()) < 1e-3


def test_bad_arguments():
    k_cache = randn(2, 16, 1, 160, seed=2, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="head_dim_v must be in"):
        quantize_k_cache(k_cache, 161)
    with pytest.raises(ValueError, match="head_dim_v a multiple of 4"):
        quantize_k_cache(k_cache, 126)
    with pytest.raises(TypeError, match="k_cache must have dtype"):
        quantize_k_cache(k_cache.int(), 128)
    fp8 = quantize_k_cache(k_cache, 128)
    with pytest.raises(ValueError, match="k_cache must hold 196 bytes per token"):
        dequantize_k_cache(fp8[..., :-2], 160, 128)
    with pytest.raises(TypeError, match="k_cache must have dtype float8_e4m3fn or uint8"):
        dequantize_k_cache(k_cache, 160, 128)


def test_model1_layout():
    """FlashMLA's MODEL1 layout: per block, every token's 448 FP8 + 64 bf16 values, then
    every token's 7 power-of-two scales (UE8M0) and a byte of padding."""
    k_cache = randn(3, 16, 1, 512, seed=3, dtype=torch.bfloat16)
    k_cache[1, 5, 0, 64:128] *= 100  # a tile with its own, larger scale
    fp8 = quantize_k_cache(k_cache, 512, "model1")
    assert fp8.dtype == torch.float8_e4m3fn and fp8.shape == (3, 16, 1, 584) and fp8.is_contiguous()
    block = fp8[1].view(torch.uint8).flatten()
    data, exponents = block[5 * 576:6 * 576], block[16 * 576 + 5 * 8:16 * 576 + 5 * 8 + 7]
    assert torch.equal(data[448:].view(torch.bfloat16), k_cache[1, 5, 0, 448:])
    scales = torch.exp2(exponents.double() - 127)
    amax = k_cache[1, 5, 0, :448].double().abs().view(7, 64).amax(dim=1)
    assert ((scales >= amax / 448) & (scales < 2 * amax / 448)).all() and scales[1] > 50 * scales[0]
    value = data[:448].view(torch.float8_e4m3fn).double() * scales.repeat_interleave(64)
    back = dequantize_k_cache(fp8, 512, 512)
    assert torch.equal(back[1, 5, 0, :448], value.to(torch.bfloat16))
    assert torch.equal(back[..., 448:], k_cache[..., 448:]) and calc_diff(back.float(), k_cache.float()) < 1e-3
    apart = torch.empty(3, 17, 1, 584, dtype=fp8.dtype)[:, :16].copy_(fp8)  # blocks further apart
    assert torch.equal(dequantize_k_cache(apart, 512, 512), back)


def test_model1_bad_arguments():
    with pytest.raises(ValueError, match="the MODEL1 layout holds head_dim 512 and head_dim_v 512 for one KV head"):
        quantize_k_cache(randn(2, 16, 1, 576, seed=4), 512, "model1")
    with pytest.raises(ValueError, match="layout must be one of v32, model1; got 'v4'"):
        quantize_k_cache(randn(2, 16, 1, 576, seed=4), 512, "v4")
    with pytest.raises(ValueError, match=r"k_cache must hold 528 bytes per token \(or 584, the MODEL1 layout\)"):
        dequantize_k_cache(torch.zeros(2, 16, 1, 600, dtype=torch.uint8), 512, 512)
