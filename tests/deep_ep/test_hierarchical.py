"""Hierarchical normal mode on "2 nodes x 2 ranks" (4 processes on this
machine): the same contract as within a node (held against the same
reference), and the byte accounting that shows a token crossing between nodes
once per destination node."""

from __future__ import annotations

import os

import pytest
import torch

from dsinfra.deep_ep import Buffer, reference
from dsinfra.fp8 import per_token_cast_to_fp8
from dsinfra.testing import calc_diff
from tests.deep_ep.helpers import HIDDEN, NUM_RANKS, NUM_TOPK, WORLD_EXPERTS, dispatch_and_wait, layout_kwargs, raised, rank_inputs

RANKS_PER_NODE, NUM_EXPERTS = 2, WORLD_EXPERTS
ROW_BYTES = HIDDEN * 2 + NUM_TOPK * (8 + 4)  # bf16 token with its top-k ids and weights


def _run_ranks(rank, world_size, group):
    os.environ["LOCAL_WORLD_SIZE"] = str(RANKS_PER_NODE)  # as torchrun would set it on 2 nodes
    buffer = Buffer(group, num_nvl_bytes=int(1e8), num_rdma_bytes=int(1e8))
    x, topk_idx, topk_weights = rank_inputs(rank, NUM_EXPERTS)
    layout = layout_kwargs(buffer, topk_idx, NUM_EXPERTS)
    topk = {"topk_idx": topk_idx, "topk_weights": topk_weights}
    out = {"nodes": (buffer.num_nodes, buffer.num_ranks_per_node), "layout": layout}

    buffer.traffic.reset()
    out["bf16"] = dispatch_and_wait(buffer, x, **layout, **topk)
    out["dispatch traffic"] = (buffer.traffic.intranode_bytes, buffer.traffic.internode_bytes)
    handle = out["bf16"]["handle"]
    out["fp8 async"] = dispatch_and_wait(buffer, per_token_cast_to_fp8(x), **layout, **topk, async_finish=True)
    out["cached"] = dispatch_and_wait(buffer, x, handle=handle, async_finish=True)
    out["cached fp8"] = dispatch_and_wait(buffer, per_token_cast_to_fp8(x), handle=handle)
    buffer.traffic.reset()
    combined_x, combined_weights, event = buffer.combine(out["bf16"]["recv_x"], handle, topk_weights=out["bf16"]["recv_topk_weights"], async_finish=True)
    event.current_stream_wait()
    out["combine traffic"] = (buffer.traffic.intranode_bytes, buffer.traffic.internode_bytes)
    out["combine"] = (combined_x, combined_weights)

    out["worst"] = dispatch_and_wait(buffer, x, **layout, **topk, num_worst_tokens=64)
    del os.environ["LOCAL_WORLD_SIZE"]
    by_argument = Buffer(group, num_nvl_bytes=int(1e8), num_rdma_bytes=int(1e8), num_ranks_per_node=RANKS_PER_NODE)
    out["by argument"] = dispatch_and_wait(by_argument, x, **layout_kwargs(by_argument, topk_idx, NUM_EXPERTS), **topk)
    small = Buffer(group, num_nvl_bytes=int(1e8), num_rdma_bytes=100, num_ranks_per_node=RANKS_PER_NODE)
    out["small rdma buffer"] = raised(lambda: small.dispatch(x, **layout))
    out["bad rdma counts"] = raised(lambda: buffer.dispatch(x, **dict(layout, num_tokens_per_rdma_rank=layout["num_tokens_per_rdma_rank"] + 1)))
    return out


@pytest.fixture(scope="module")
def ranks(all_ranks):
    return [result["hierarchical"] for result in all_ranks]


def test_layout_counts_tokens_per_node(ranks, expected):
    _, idxs, _ = expected["inputs"]
    for rank, result in enumerate(ranks):
        assert result["nodes"] == (2, RANKS_PER_NODE)
        per_rank, per_rdma_rank, per_expert, in_rank = reference.get_dispatch_layout(idxs[rank], NUM_EXPERTS, NUM_RANKS, 2)
        layout = result["layout"]
        assert torch.equal(layout["num_tokens_per_rank"], per_rank)
        assert torch.equal(layout["num_tokens_per_rdma_rank"], per_rdma_rank)
        assert torch.equal(layout["num_tokens_per_expert"], per_expert)
        assert torch.equal(layout["is_token_in_rank"], in_rank)


@pytest.mark.parametrize("case", ["bf16", "cached", "by argument"])
def test_dispatch_keeps_the_contract(ranks, expected, case):
    for rank, result in enumerate(ranks):
        want, got = expected["dispatch"][rank], result[case]
        assert torch.equal(got["recv_x"], want["recv_x"])
        if case != "cached":
            assert torch.equal(got["recv_topk_idx"], want["recv_topk_idx"])
            assert torch.equal(got["recv_topk_weights"], want["recv_topk_weights"])
            assert got["counts"] == want["num_recv_tokens_per_expert"]
            # upstream's internode handle: 10 fields, is_token_in_rank first, the
            # prefix sums over source ranks of the rows received at [-4]
            handle = got["handle"]
            assert len(handle) == 10 and torch.equal(handle[0], result["layout"]["is_token_in_rank"])
            assert torch.equal(handle[-4], want["rank_prefix_matrix"][:, rank])
            # [4]: tokens this rank forwards, from the same local index on nodes 0..n
            node, local = divmod(rank, RANKS_PER_NODE)
            _, idxs, _ = expected["inputs"]
            from_nodes = []
            for source in (local, RANKS_PER_NODE + local):
                in_rank = reference.get_dispatch_layout(idxs[source], NUM_EXPERTS, NUM_RANKS, 2)[3]
                from_nodes.append(int(in_rank.view(-1, 2, RANKS_PER_NODE)[:, node].any(dim=1).sum()))
            assert handle[4].tolist() == [from_nodes[0], sum(from_nodes)]


def test_num_worst_tokens_across_nodes(ranks, expected):
    for rank, result in enumerate(ranks):
        got, want = result["worst"], expected["dispatch"][rank]
        num_recv = len(want["sources"])
        assert got["counts"] == [] and got["recv_x"].shape[0] == got["recv_topk_idx"].shape[0] == 64
        assert torch.equal(got["recv_x"][:num_recv], want["recv_x"]) and torch.all(got["recv_x"][num_recv:] == 0)
        assert torch.equal(got["recv_topk_idx"][:num_recv], want["recv_topk_idx"]) and torch.all(got["recv_topk_idx"][num_recv:] == -1)


@pytest.mark.parametrize("case", ["fp8 async", "cached fp8"])
def test_fp8_dispatch_delivers_the_exact_bytes(ranks, expected, case):
    xs, _, _ = expected["inputs"]
    casts = [per_token_cast_to_fp8(x) for x in xs]
    for rank, result in enumerate(ranks):
        got = result[case]
        assert got["dtypes"] == [torch.float8_e4m3fn, torch.float32]
        for row, (src, token) in enumerate(expected["dispatch"][rank]["sources"]):
            assert torch.equal(got["recv_x"][0][row], casts[src][0][token].view(torch.uint8))
            assert torch.equal(got["recv_x"][1][row], casts[src][1][token])


def test_combine_sums_back_across_nodes(ranks, expected):
    xs, idxs, weights = expected["inputs"]
    want = reference.combine([r["bf16"]["recv_x"] for r in ranks], [d["sources"] for d in expected["dispatch"]], [len(x) for x in xs])
    for rank, result in enumerate(ranks):
        combined_x, combined_weights = result["combine"]
        assert calc_diff(combined_x.float(), want[rank]) < 1e-5
        destinations = result["layout"]["is_token_in_rank"].sum(dim=1, keepdim=True)
        sent = destinations.squeeze(1) > 0
        assert calc_diff(combined_x[sent].float() / destinations[sent], xs[rank][sent].float()) < 5e-6
        assert torch.equal(combined_weights, weights[rank].masked_fill(idxs[rank] < 0, 0.0))


def test_tokens_cross_nodes_once_per_destination_node(ranks, expected):
    prefix = expected["dispatch"][0]["rank_prefix_matrix"]
    sent = torch.cat([prefix[:1], prefix[1:] - prefix[:-1]]).tolist()  # [i][j]: tokens rank i sends to rank j
    combine_row_bytes = HIDDEN * 2 + NUM_TOPK * 4  # bf16 rows with their float32 weights

    def crossing(rank: int) -> int:
        """Tokens of ``rank`` needed on the other node."""
        in_rank = ranks[rank]["layout"]["is_token_in_rank"].view(-1, 2, RANKS_PER_NODE)
        return int(in_rank[:, 1 - rank // RANKS_PER_NODE].any(dim=1).sum())

    flat_internode_rows = 0
    for rank, result in enumerate(ranks):
        peer, local = rank ^ 1, rank % RANKS_PER_NODE  # the other rank of the node; this rank's local index
        other_node = 1 - rank // RANKS_PER_NODE
        flat_internode_rows += sum(sent[rank][j] for j in range(NUM_RANKS) if j // RANKS_PER_NODE == other_node)
        # dispatch: each token crosses once to a needing node (with its is_token_in_rank row the first time);
        # inside the node a forwarder passes on what its peer needs from the sources with its local index
        forwarded = sum(sent[n * RANKS_PER_NODE + local][peer] for n in range(2))
        assert result["dispatch traffic"] == (forwarded * ROW_BYTES, crossing(rank) * (ROW_BYTES + NUM_RANKS))
        # combine: rows go back to the forwarder they came through, then one summed row per token and node
        came_through_peer = sum(sent[n * RANKS_PER_NODE + peer % RANKS_PER_NODE][rank] for n in range(2))
        arrived_from_other_node = crossing(other_node * RANKS_PER_NODE + local)
        assert result["combine traffic"] == (came_through_peer * combine_row_bytes, arrived_from_other_node * combine_row_bytes)
    hierarchical_internode_rows = sum(crossing(rank) for rank in range(NUM_RANKS))
    # the receivers had to reorder: rows from ranks 1 and 2 arrive through different forwarders, rank 2's first
    assert any(sent[1][rank] and sent[2][rank] for rank in range(NUM_RANKS))
    assert hierarchical_internode_rows < flat_internode_rows  # tokens needed by both ranks of a node crossed once


def test_buffer_limits_and_rdma_counts_reach_every_rank(ranks):
    messages = {result["small rdma buffer"] for result in ranks}
    assert len(messages) == 1
    kind, message = messages.pop()
    assert kind == "ValueError" and "from other nodes" in message and "num_rdma_bytes (100)" in message
    for result in ranks:
        kind, message = result["bad rdma counts"]
        assert kind in ("ValueError", "RuntimeError") and ("num_tokens_per_rdma_rank" in message or "rejected its arguments" in message)
