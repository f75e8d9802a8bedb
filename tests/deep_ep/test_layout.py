"""get_dispatch_layout: the vectorised (torch) and Triton implementations
equal the reference's plain count, over awkward shapes (no tokens, one
token, all experts dropped, ranks and nodes that are not powers of two)."""

from __future__ import annotations

import pytest
import torch

from dsinfra import backend
from dsinfra.deep_ep import reference
from dsinfra.testing import topk_indices

# (num_tokens, num_experts, num_topk, num_ranks, num_nodes, drop)
SHAPES = [
    (0, 8, 2, 4, 1, 0.0),
    (1, 8, 3, 2, 1, 0.0),
    (37, 16, 4, 4, 2, 0.2),
    (5, 6, 6, 3, 3, 0.3),
    (9, 12, 3, 6, 2, 1.0),
    (300, 64, 8, 8, 2, 0.1),
]


def _check(implementation: str, shape, device) -> None:
    num_tokens, num_experts, num_topk, num_ranks, num_nodes, drop = shape
    topk_idx = topk_indices(num_tokens, num_experts, num_topk, seed=num_tokens, skew=1.0, drop=drop)
    want = reference.get_dispatch_layout(topk_idx, num_experts, num_ranks, num_nodes)
    impl = backend.load("dsinfra.deep_ep", implementation)
    got = impl.get_dispatch_layout(topk_idx.to(device), num_experts, num_ranks, num_nodes)
    for name, w, g in zip(("per rank", "per node", "per expert", "is_token_in_rank"), want, got):
        if w is None:
            assert g is None, name
            continue
        assert g.dtype == w.dtype and g.device.type == torch.device(device).type, name
        assert torch.equal(g.cpu(), w), name


@pytest.mark.parametrize("shape", SHAPES)
def test_torch_layout_equals_reference(shape):
    _check("torch", shape, "cpu")


@pytest.mark.parametrize("shape", SHAPES[:5])
def test_triton_layout_equals_reference(shape, kernel_device):
    _check("triton", shape, kernel_device)


@pytest.mark.gpu
@pytest.mark.parametrize("shape", SHAPES)
def test_layouts_on_the_gpu(shape):
    _check("torch", shape, "cuda")
    _check("triton", shape, "cuda")
