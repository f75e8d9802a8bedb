"""FP8Linear against a bf16 nn.Linear: outputs and all gradients within DeepGEMM's
bound, for the shapes the MoE experts use (features multiples of 16, any number
of tokens, none included)."""

import pytest
import torch

from dsinfra.deep_gemm import FP8Linear
from dsinfra.testing import calc_diff, randn

from .data import call

BOUND = 1e-3


def twin_layers(in_features, out_features, bias, seed=0):
    """An FP8Linear with float32 master weights and a bf16 nn.Linear holding the same values."""
    torch.manual_seed(seed)
    fp8_layer = FP8Linear(in_features, out_features, bias=bias)
    bf16_layer = torch.nn.Linear(in_features, out_features, bias=bias, dtype=torch.bfloat16)
    with torch.no_grad():
        bf16_layer.weight.copy_(fp8_layer.weight)
        if bias:
            bf16_layer.bias.copy_(fp8_layer.bias)
    return fp8_layer, bf16_layer


def forward_backward(layer, x, grad):
    layer.zero_grad()
    x = x.detach().clone().requires_grad_()
    y = layer(x)
    y.backward(grad)
    grads = [x.grad, layer.weight.grad] + ([layer.bias.grad] if layer.bias is not None else [])
    return y.detach(), grads


@pytest.mark.parametrize("implementation", ["torch", "reference"])
@pytest.mark.parametrize(
    "shape,in_features,out_features,bias",
    [((300,), 256, 128, True), ((2, 37), 80, 48, False), ((129,), 256, 256, True)],
)
def test_matches_bf16_linear(implementation, shape, in_features, out_features, bias):
    fp8_layer, bf16_layer = twin_layers(in_features, out_features, bias)
    x = randn(*shape, in_features, seed=1, dtype=torch.bfloat16)
    grad = randn(*shape, out_features, seed=2, dtype=torch.bfloat16)
    y, grads = call(implementation, forward_backward, fp8_layer, x, grad)
    y_ref, grads_ref = forward_backward(bf16_layer, x, grad)
    assert y.dtype == torch.bfloat16 and y.shape == (*shape, out_features)
    assert calc_diff(y, y_ref) < BOUND
    assert grads[1].dtype == torch.float32  # gradients in the master weights' dtype
    for name, g, g_ref in zip(["x", "weight", "bias"], grads, grads_ref):
        assert calc_diff(g, g_ref) < BOUND, name


def test_float32_input_and_no_tokens():
    layer, _ = twin_layers(64, 32, True)
    y, grads = forward_backward(layer, randn(5, 64, seed=3), torch.ones(5, 32))
    assert y.dtype == torch.float32 and grads[0].dtype == torch.float32
    y, grads = forward_backward(layer, torch.zeros(0, 64), torch.zeros(0, 32))  # an expert with no tokens
    assert y.shape == (0, 32) and grads[0].shape == (0, 64)
    assert (grads[1] == 0).all() and (grads[2] == 0).all()


def test_bad_input():
    layer = FP8Linear(64, 32)
    with pytest.raises(ValueError, match=r"x must have shape \[\.\.\., 64\]"):
        layer(torch.zeros(4, 63))
    with pytest.raises(TypeError, match="x must have dtype"):
        layer(torch.zeros(4, 64, dtype=torch.int32))
