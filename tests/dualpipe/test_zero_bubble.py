"""ZeroBubbleLinear: the gradients of nn.Linear, computed now or deferred to WeightGradStore."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dsinfra.dualpipe import WeightGradStore, ZeroBubbleLinear


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("deferred", [True, False])
def test_gradients_equal_nn_linear(bias, deferred):
    torch.manual_seed(0)
    reference = nn.Linear(6, 5, bias=bias)
    linear = ZeroBubbleLinear(6, 5, bias=bias)
    linear.load_state_dict(reference.state_dict())
    x = torch.randn(2, 3, 6)
    for _ in range(2):  # the second backward accumulates
        x_reference = x.clone().requires_grad_()
        reference(x_reference).square().sum().backward()
        x_mine = x.clone().requires_grad_()
        WeightGradStore.clear()
        WeightGradStore.enabled = deferred
        linear(x_mine).square().sum().backward()
        WeightGradStore.enabled = False
        WeightGradStore.flush()
        assert (linear.weight.grad is None) == (deferred and _ == 0)
        WeightGradStore.pop()
        assert WeightGradStore.funcs_queue.empty()
        torch.testing.assert_close(x_mine.grad, x_reference.grad)
    torch.testing.assert_close(linear.weight.grad, reference.weight.grad)
    if bias:
        torch.testing.assert_close(linear.bias.grad, reference.bias.grad)
    assert not linear.weight.grad.requires_grad


def test_pop_without_a_group():
    WeightGradStore.clear()
    with pytest.raises(RuntimeError, match="no flushed weight-gradient group"):
        WeightGradStore.pop()
