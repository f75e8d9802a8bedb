import pytest
import torch

from dsinfra.fp8 import FP8_MAX, per_block_cast_back, per_block_cast_to_fp8, per_token_cast_back, per_token_cast_to_fp8
from dsinfra.testing import calc_diff, randn


@pytest.mark.parametrize("shape", [(1, 128), (5, 256), (3, 16), (7, 200), (2, 3, 384)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_per_token_round_trip(shape, dtype):
    x = randn(*shape, seed=0, dtype=dtype)
    x_fp8, scales = per_token_cast_to_fp8(x)
    assert x_fp8.dtype == torch.float8_e4m3fn and x_fp8.shape == x.shape
    assert scales.dtype == torch.float32 and scales.shape == (*shape[:-1], -(-shape[-1] // 128))
    assert x_fp8.is_contiguous()
    assert calc_diff(per_token_cast_back(x_fp8, scales), x.float()) < 1e-3
    # every group uses the full fp8 range
    assert x_fp8.float().abs().amax() == FP8_MAX


def test_per_token_scales_are_per_group():
    x = torch.cat([torch.full((1, 128), 1.0), torch.full((1, 72), 1000.0)], dim=1)
    x_fp8, scales = per_token_cast_to_fp8(x)
    assert scales.tolist() == [[pytest.approx(1 / 448), pytest.approx(1000 / 448)]]
    torch.testing.assert_close(per_token_cast_back(x_fp8, scales), x)


def test_zeros_stay_finite():
    x_fp8, scales = per_token_cast_to_fp8(torch.zeros(2, 128))
    assert torch.isfinite(scales).all() and (x_fp8.float() == 0).all()
    b_fp8, b_scales = per_block_cast_to_fp8(torch.zeros(130, 128))
    assert torch.isfinite(b_scales).all() and (b_fp8.float() == 0).all()


@pytest.mark.parametrize("shape", [(128, 128), (1, 64), (130, 300), (256, 512)])
def test_per_block_round_trip(shape):
    x = randn(*shape, seed=1)
    x_fp8, scales = per_block_cast_to_fp8(x)
    assert x_fp8.shape == x.shape and scales.shape == (-(-shape[0] // 128), -(-shape[1] // 128))
    assert x_fp8.is_contiguous()  # row-major like its input, as GEMMs read weights
    assert calc_diff(per_block_cast_back(x_fp8, scales), x) < 1e-3


def test_per_block_scales_are_per_block():
    x = torch.ones(256, 256)
    x[128:, 128:] = 10.0
    _, scales = per_block_cast_to_fp8(x)
    torch.testing.assert_close(scales, torch.tensor([[1.0, 1.0], [1.0, 10.0]]) / 448)


def test_bad_input():
    with pytest.raises(TypeError, match="x must have dtype"):
        per_token_cast_to_fp8(torch.zeros(2, 128, dtype=torch.int32))
    with pytest.raises(ValueError, match="x must have 2 dimensions"):
        per_block_cast_to_fp8(torch.zeros(2, 3, 128))
    x_fp8, scales = per_token_cast_to_fp8(torch.ones(2, 256))
    with pytest.raises(ValueError, match="scales must have shape"):
        per_token_cast_back(x_fp8, scales[:, :1])
    with pytest.raises(TypeError, match="x_fp8 must have dtype float8_e4m3fn"):
        per_token_cast_back(x_fp8.float(), scales)
