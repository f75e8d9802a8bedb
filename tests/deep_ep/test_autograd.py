"""Gradients through dispatch and combine equal those of a single-process MoE
layer: on 2-rank expert-parallel subgroups of the 4 ranks (as a pipeline's
stages would hold them), each rank holding 2 of 4 linear experts, one
backward pass through dsinfra.deep_ep.autograd; on the second subgroup the
backward's collectives run on a buffer of their own."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from dsinfra.deep_ep import Buffer
from dsinfra.deep_ep import autograd as ep
from dsinfra.testing import randn
from tests.deep_ep.helpers import HIDDEN, subgroup_inputs

SUBGROUPS, NUM_EXPERTS = ([0, 1], [2, 3]), 4
NUM_LOCAL = NUM_EXPERTS // 2


def _experts() -> list[torch.Tensor]:
    return [randn(HIDDEN, HIDDEN, seed=300 + e) / HIDDEN**0.5 for e in range(NUM_EXPERTS)]


def _output_grad(rank: int, num_tokens: int) -> torch.Tensor:
    return randn(num_tokens, HIDDEN, seed=400 + rank)


def _run_ranks(rank, world_size, group):
    subgroup = [dist.new_group(ranks) for ranks in SUBGROUPS][rank // 2]
    backward_group = [dist.new_group(ranks) for ranks in SUBGROUPS][rank // 2]
    buffer = Buffer(subgroup, num_nvl_bytes=int(1e8))
    # ranks 2 and 3 run the backward's collectives on a second buffer (as DualPipe's overlap needs)
    backward_buffer = Buffer(backward_group, num_nvl_bytes=int(1e8)) if rank >= 2 else None
    x, topk_idx, topk_weights = subgroup_inputs(rank, NUM_EXPERTS, dtype=torch.float32)
    x.requires_grad_(True)
    topk_weights.requires_grad_(True)
    first = subgroup.rank() * NUM_LOCAL
    experts = [w.requires_grad_(True) for w in _experts()[first : first + NUM_LOCAL]]

    recv_x, recv_topk_idx, recv_topk_weights, counts, handle = ep.dispatch(
        buffer, x, topk_idx, topk_weights, NUM_EXPERTS, backward_buffer=backward_buffer
    )
    y = torch.zeros_like(recv_x)
    for e, weight in enumerate(experts):
        rows, k = (recv_topk_idx == e).nonzero(as_tuple=True)
        y = y.index_add(0, rows, (recv_x[rows] @ weight) * recv_topk_weights[rows, k, None])
    out = ep.combine(buffer, y, handle, backward_buffer=backward_buffer)
    forward_bytes = buffer.traffic.intranode_bytes
    # the last term also touches the weights of experts held elsewhere (constant zeros: no gradient)
    ((out * _output_grad(rank, len(x))).sum() + recv_topk_weights.sum()).backward()
    backward_bytes = buffer.traffic.intranode_bytes - forward_bytes
    if backward_buffer is not None:
        assert backward_bytes == 0 and backward_buffer.traffic.intranode_bytes > 0, "the backward used the wrong buffer"
    else:
        assert backward_bytes > 0
    return {"out": out.detach(), "x": x.grad, "topk_weights": topk_weights.grad, "experts": [w.grad for w in experts]}


def _single_process_moe(members: list[int]):
    """The members' tokens through all experts in one process: outputs and gradients."""
    inputs = [subgroup_inputs(rank, NUM_EXPERTS, dtype=torch.float32) for rank in members]
    experts = [w.requires_grad_(True) for w in _experts()]
    loss, outs, leaves = 0.0, [], []
    for rank, (x, idx, w) in zip(members, inputs):
        x.requires_grad_(True)
        w.requires_grad_(True)
        leaves.append((x, w))
        out = torch.zeros_like(x)
        for token in range(len(x)):
            for k, e in enumerate(idx[token].tolist()):
                if e >= 0:
                    out[token] = out[token] + w[token, k] * (x[token] @ experts[e])
        outs.append(out.detach())
        loss = loss + (out * _output_grad(rank, len(x))).sum() + w.masked_fill(idx < 0, 0.0).sum()
    loss.backward()

    def grad(t: torch.Tensor) -> torch.Tensor:  # a rank without tokens takes no part in the loss
        return t.grad if t.grad is not None else torch.zeros_like(t)

    return outs, [grad(x) for x, _ in leaves], [grad(w) for _, w in leaves], [grad(e) for e in experts]


@pytest.fixture(scope="module")
def ranks(all_ranks):
    return [result["autograd"] for result in all_ranks]


@pytest.mark.parametrize("members", SUBGROUPS)
def test_gradients_equal_a_single_process_moe_layer(ranks, members):
    # float32 sums of 256 products in another order: agreement to 1e-4, where a misrouted row is off by O(1)
    outs, x_grads, weight_grads, expert_grads = _single_process_moe(members)
    for i, rank in enumerate(members):
        result = ranks[rank]
        torch.testing.assert_close(result["out"], outs[i], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(result["x"], x_grads[i], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(result["topk_weights"], weight_grads[i], rtol=1e-4, atol=1e-4)
        for e in range(NUM_LOCAL):
            torch.testing.assert_close(result["experts"][e], expert_grads[i * NUM_LOCAL + e], rtol=1e-4, atol=1e-4)
    assert any(grad.abs().sum() > 0 for grad in x_grads)
