import pytest
import torch

from dsinfra.fp8 import (
    FP8_MAX,
    REBIAS,
    fp8_bits_widened,
    fp8_to_float,
    per_block_cast_back,
    per_block_cast_to_fp8,
    per_token_cast_back,
    per_token_cast_to_fp8,
)
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


ALL_FP8 = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(torch.float8_e4m3fn)  # every byte: ±0, subnormals, NaN


def test_fp8_to_float_is_exact_for_every_byte():
    widened = fp8_to_float(ALL_FP8)
    expected = ALL_FP8.float()
    assert widened.dtype == torch.float32
    assert torch.equal(widened.isnan(), expected.isnan()) and int(expected.isnan().sum()) == 2
    assert torch.equal(widened.view(torch.int32)[~expected.isnan()], expected.view(torch.int32)[~expected.isnan()])  # -0 too


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_fp8_bits_widened_is_the_rebiased_value(dtype):
    finite = ALL_FP8[~ALL_FP8.float().isnan()]
    widened = fp8_bits_widened(finite, dtype)
    assert widened.dtype == dtype
    assert torch.equal(widened.double() * REBIAS, finite.double())
    out = torch.zeros(3, finite.numel() + 5, dtype=torch.int16 if dtype == torch.bfloat16 else torch.int32)
    strided = finite.expand(3, -1)[:, ::2]  # stride 0 and 2 on the input, a slice for the output
    fp8_bits_widened(strided, dtype, out=out[:, 1 : 1 + strided.shape[1]])
    assert torch.equal(out[:, 1 : 1 + strided.shape[1]].view(dtype).double() * REBIAS, strided.double())
    assert (out[:, 0] == 0).all()


@pytest.mark.parametrize("shape", [(3, 256), (2, 200), (4, 1, 72)])
def test_cast_backs_equal_the_plain_formula(shape):
    """The fast cast-backs give, bit for bit, x.float() times the expanded scales."""
    x_fp8, scales = per_token_cast_to_fp8(randn(*shape, seed=3))
    k = shape[-1]
    expected = x_fp8.float() * scales.repeat_interleave(128, dim=-1)[..., :k]
    assert torch.equal(per_token_cast_back(x_fp8, scales), expected)
    assert torch.equal(per_token_cast_back(x_fp8, scales, torch.bfloat16), expected.bfloat16())
    if len(shape) == 2:
        b_fp8, b_scales = per_block_cast_to_fp8(randn(*shape, seed=4) * 1e-3)
        expanded = b_scales.repeat_interleave(128, dim=0)[: shape[0]].repeat_interleave(128, dim=1)[:, :k]
        assert torch.equal(per_block_cast_back(b_fp8, b_scales), b_fp8.float() * expanded)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_casts_equal_the_plain_formula(dtype):
    """The casts work in row chunks of about 1 MiB on a CPU; inputs of several chunks
    give, bit for bit, the one-pass formula."""
    x = randn(3000, 200, seed=5, dtype=dtype) * torch.logspace(-3, 3, 3000)[:, None].to(dtype)
    groups = torch.nn.functional.pad(x.float(), (0, 56)).unflatten(-1, (-1, 128))
    scales = groups.abs().amax(dim=-1).clamp(min=1e-4) / FP8_MAX
    expected = (groups / scales[..., None]).flatten(-2)[:, :200].to(torch.float8_e4m3fn)
    x_fp8, x_scales = per_token_cast_to_fp8(x)
    assert torch.equal(x_scales, scales) and torch.equal(x_fp8.view(torch.uint8), expected.view(torch.uint8))

    w = randn(300, 1100, seed=6, dtype=dtype)
    padded = torch.nn.functional.pad(w.float(), (0, 52, 0, 84))
    blocks = padded.unflatten(0, (-1, 128)).unflatten(2, (-1, 128))
    block_scales = blocks.abs().amax(dim=(1, 3)).clamp(min=1e-4) / FP8_MAX
    expected = (blocks / block_scales[:, None, :, None]).flatten(2).flatten(0, 1)[:300, :1100].to(torch.float8_e4m3fn)
    w_fp8, w_scales = per_block_cast_to_fp8(w)
    assert torch.equal(w_scales, block_scales) and torch.equal(w_fp8.view(torch.uint8), expected.view(torch.uint8))


def test_widening_bad_input():
    with pytest.raises(TypeError, match="x must have dtype float8_e4m3fn"):
        fp8_to_float(torch.zeros(3))
    with pytest.raises(TypeError, match="dtype must be torch.bfloat16 or torch.float32"):
        fp8_bits_widened(ALL_FP8, torch.float16)
    with pytest.raises(TypeError, match="out must have dtype int16"):
        fp8_bits_widened(ALL_FP8, torch.bfloat16, out=torch.zeros(256, dtype=torch.int32))
    with pytest.raises(ValueError, match="out must have shape"):
        fp8_bits_widened(ALL_FP8, torch.float32, out=torch.zeros(255, dtype=torch.int32))
    x_fp8, scales = per_token_cast_to_fp8(torch.ones(2, 256))
    with pytest.raises(TypeError, match="out must have dtype bfloat16"):
        per_token_cast_back(x_fp8, scales, torch.bfloat16, out=torch.empty(2, 256))


def test_fp8_to_float_keeps_the_sign_and_payload_of_nan():
    nan_bytes = torch.tensor([0x7F, 0xFF], dtype=torch.uint8).view(torch.float8_e4m3fn)
    assert torch.equal(fp8_to_float(nan_bytes).view(torch.int32), nan_bytes.float().view(torch.int32))
    assert torch.equal(fp8_to_float(ALL_FP8).view(torch.int32), ALL_FP8.float().view(torch.int32))


def test_per_token_cast_back_into_a_permuted_out():
    x_fp8, scales = per_token_cast_to_fp8(randn(2, 3, 200, seed=7))
    out = torch.full((3, 2, 200), float("nan"), dtype=torch.bfloat16).permute(1, 0, 2)  # no [-1, k] view
    assert per_token_cast_back(x_fp8, scales, torch.bfloat16, out=out) is out
    assert torch.equal(out, per_token_cast_back(x_fp8, scales, torch.bfloat16))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_casts_never_make_nan_bytes_from_finite_input(dtype):
    """Values far beyond 448 (where a plain .to(float8_e4m3fn) may give NaN bytes)
    are scaled into range: no 0x7f / 0xff byte, and the round trip stays finite."""
    big = torch.finfo(dtype).max
    x = torch.tensor([[big, -big, 480.0, 1e4] * 64, [1.0, -500.0, 0.0, 3.0] * 64], dtype=dtype)
    token_fp8, token_scales = per_token_cast_to_fp8(x)
    block_fp8, block_scales = per_block_cast_to_fp8(x)
    for x_fp8 in (token_fp8, block_fp8):
        assert not (x_fp8.view(torch.uint8) & 0x7F).eq(0x7F).any()
    assert per_token_cast_back(token_fp8, token_scales).isfinite().all()
    assert per_block_cast_back(block_fp8, block_scales).isfinite().all()
