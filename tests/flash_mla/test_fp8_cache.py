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
