"""Every operation gives the same result whatever torch's default dtype is:
the same calls, made once under float32 and once under bfloat16 (as
DeepSeek's tests and many training scripts set it), return identical tensors."""

from __future__ import annotations

import pytest
import torch

from dsinfra.deep_ep import Buffer
from dsinfra.deep_ep import autograd as ep
from dsinfra.fp8 import per_token_cast_to_fp8
from tests.deep_ep.helpers import WORLD_EXPERTS, dispatch_and_wait, layout_kwargs, rank_inputs

MAX_TOKENS = 16


def _every_operation(group, x, topk_idx, topk_weights) -> dict:
    topk = {"topk_idx": topk_idx, "topk_weights": topk_weights}
    out = {}
    for name, buffer in (("flat", Buffer(group, int(1e8))), ("hierarchical", Buffer(group, int(1e8), int(1e8), num_ranks_per_node=2))):
        layout = layout_kwargs(buffer, topk_idx, WORLD_EXPERTS)
        out[f"{name} layout"] = layout
        bf16 = dispatch_and_wait(buffer, x, **layout, **topk)
        out[f"{name} bf16"] = {k: v for k, v in bf16.items() if k != "handle"}
        fp8 = dispatch_and_wait(buffer, per_token_cast_to_fp8(x), **layout, **topk)
        out[f"{name} fp8"] = {k: v for k, v in fp8.items() if k != "handle"}
        out[f"{name} combine"] = buffer.combine(bf16["recv_x"], bf16["handle"], topk_weights=bf16["recv_topk_weights"])[:2]
    low_latency = Buffer(group, 0, int(1e8), low_latency_mode=True)
    for name, flags in (("fp8", {}), ("round_scale", {"round_scale": True}), ("bf16", {"use_fp8": False})):
        recv_x, count, handle, _, _ = low_latency.low_latency_dispatch(x, topk_idx, MAX_TOKENS, WORLD_EXPERTS, **flags)
        fp8 = isinstance(recv_x, tuple)
        y = torch.ones(recv_x[0].shape if fp8 else recv_x.shape, dtype=torch.bfloat16)
        fields = [t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t for t in (recv_x if fp8 else (recv_x,))]
        out[f"low-latency {name}"] = ([[t[e, :c] for e, c in enumerate(count.tolist())] for t in fields], count)
        out[f"low-latency {name} combine"] = low_latency.low_latency_combine(y, topk_idx, topk_weights.abs(), handle)[0]
    flat = Buffer(group, int(1e8))
    x_grad, weights_grad = x.float().requires_grad_(), topk_weights.clone().requires_grad_()
    recv_x, _, recv_weights, _, handle = ep.dispatch(flat, x_grad, topk_idx, weights_grad, WORLD_EXPERTS)
    combined = ep.combine(flat, recv_x * 2 + recv_weights.sum(dim=1, keepdim=True), handle)
    combined.square().sum().backward()
    out["autograd"] = (combined.detach(), x_grad.grad, weights_grad.grad)
    return out


def _run_ranks(rank, world_size, group):
    inputs = rank_inputs(rank, WORLD_EXPERTS)  # made under float32, the same for both runs
    results = {}
    for dtype in (torch.float32, torch.bfloat16):
        torch.set_default_dtype(dtype)
        try:
            results[str(dtype)] = _every_operation(group, *inputs)
        finally:
            torch.set_default_dtype(torch.float32)
    return results


@pytest.fixture(scope="module")
def ranks(all_ranks):
    return [result["default_dtype"] for result in all_ranks]


def _assert_identical(a, b, where):
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            _assert_identical(a[key], b[key], f"{where}/{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_identical(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def test_results_do_not_depend_on_the_default_dtype(ranks):
    for rank, result in enumerate(ranks):
        _assert_identical(result["torch.float32"], result["torch.bfloat16"], f"rank {rank}")
