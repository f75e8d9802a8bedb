"""The same contract over NCCL with CUDA tensors (needs 2 GPUs): normal
dispatch and combine, FP8 and asynchronous, and a low-latency round trip,
held against the single-process reference."""

from __future__ import annotations

import pytest
import torch

from dsinfra.deep_ep import Buffer, reference
from dsinfra.fp8 import per_token_cast_back, per_token_cast_to_fp8
from dsinfra.testing import calc_diff, spawn
from tests.deep_ep.helpers import all_inputs, layout_kwargs, rank_inputs

NUM_RANKS, NUM_EXPERTS, MAX_TOKENS = 2, 8, 16

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(torch.cuda.device_count() < NUM_RANKS, reason=f"needs {NUM_RANKS} GPUs"),
]


def _run_ranks(rank, world_size, group):
    x, topk_idx, topk_weights = (t.cuda() for t in rank_inputs(rank, NUM_EXPERTS))
    buffer = Buffer(group, int(1e8), int(1e8), low_latency_mode=True)
    layout = layout_kwargs(buffer, topk_idx, NUM_EXPERTS)
    recv_x, recv_topk_idx, recv_topk_weights, counts, handle, _ = buffer.dispatch(
        x, topk_idx=topk_idx, topk_weights=topk_weights, **layout
    )
    (recv_fp8, recv_scales), _, _, _, _, event = buffer.dispatch(per_token_cast_to_fp8(x), handle=handle, async_finish=True)
    event.current_stream_wait()
    combined_x, _, event = buffer.combine(recv_x, handle, async_finish=True)
    event.current_stream_wait()
    (ll_fp8, ll_scales), recv_count, ll_handle, _, hook = buffer.low_latency_dispatch(
        x, topk_idx, MAX_TOKENS, NUM_EXPERTS, return_recv_hook=True
    )
    hook()
    y = per_token_cast_back(ll_fp8.flatten(0, 1), ll_scales.flatten(0, 1), torch.bfloat16).view(ll_fp8.shape)
    ll_combined, _, _ = buffer.low_latency_combine(y, topk_idx, topk_weights.abs(), ll_handle)
    torch.cuda.synchronize()
    return {
        "recv_x": recv_x.cpu(),
        "recv_topk_idx": recv_topk_idx.cpu(),
        "counts": counts,
        "prefix": handle[0].cpu(),
        "fp8": per_token_cast_back(recv_fp8, recv_scales, torch.bfloat16).cpu(),
        "combined_x": combined_x.cpu(),
        "recv_count": recv_count.cpu(),
        "ll_combined": ll_combined.cpu(),
        "reference_ll": (x.float() * topk_weights.abs().masked_fill(topk_idx < 0, 0).sum(1, keepdim=True)).cpu(),
    }


def test_nccl_round_trips():
    results = spawn(_run_ranks, NUM_RANKS, backend="nccl", timeout=300)
    xs, idxs, weights = all_inputs(range(NUM_RANKS), NUM_EXPERTS)
    want = reference.dispatch(xs, idxs, weights, NUM_EXPERTS)
    combined = reference.combine([r["recv_x"] for r in results], [w["sources"] for w in want], [len(x) for x in xs])
    ll_want = reference.low_latency_dispatch(xs, idxs, NUM_EXPERTS)
    for rank, got in enumerate(results):
        assert torch.equal(got["recv_x"], want[rank]["recv_x"])
        assert torch.equal(got["recv_topk_idx"], want[rank]["recv_topk_idx"])
        assert got["counts"] == want[rank]["num_recv_tokens_per_expert"]
        assert torch.equal(got["prefix"], want[rank]["rank_prefix_matrix"])
        assert calc_diff(got["fp8"].float(), want[rank]["recv_x"].float()) < 1e-3
        assert calc_diff(got["combined_x"].float(), combined[rank]) < 1e-5
        assert got["recv_count"].tolist() == ll_want[rank]["recv_count"]
        assert calc_diff(got["ll_combined"].float(), got["reference_ll"]) < 9e-4
