"""Low-latency dispatch and combine on 4 ranks and on 2-rank subgroups, held
against the single-process reference: DeepEP's test_low_latency.py checks
(counts, per-expert rows in source-rank order, src_info and layout_range,
weighted combine), FP8 and bf16, synchronous, asynchronous and with a receive
hook, padding that holds NaN and is never read, and the errors."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from dsinfra.deep_ep import Buffer, low_latency, reference
from dsinfra.deep_ep.low_latency import static_shapes
from dsinfra.fp8 import per_token_cast_back, per_token_cast_to_fp8
from dsinfra.testing import calc_diff
from tests.deep_ep.helpers import HIDDEN, NUM_RANKS, all_inputs, check_errors, raised, rank_inputs, subgroup_inputs

NUM_EXPERTS, MAX_TOKENS = 8, 16
SUBGROUPS, SUBGROUP_EXPERTS = ([0, 1], [2, 3]), 4
MODES = {
    "fp8 hook": {"return_recv_hook": True},
    "fp8 async": {"async_finish": True},
    "bf16 sync": {"use_fp8": False},
    "fp8, static shapes as on a GPU": {},
}


def _round_trip(buffer, x, topk_idx, topk_weights, num_experts, use_fp8=True, **mode) -> dict:
    """Dispatch, act as the experts (the identity on what arrived, NaN in
    every slot past the count), combine; report what came back."""
    recv_x, recv_count, handle, event, hook = buffer.low_latency_dispatch(x, topk_idx, MAX_TOKENS, num_experts, use_fp8=use_fp8, **mode)
    assert (hook is None) == (not mode.get("return_recv_hook", False))
    hook() if hook is not None else event.current_stream_wait()
    hook() if hook is not None else event.current_stream_wait()  # waiting twice does nothing more
    out = {"recv_count": recv_count, "src_info": handle.src_info, "layout_range": handle.layout_range}
    if use_fp8:
        recv_fp8, scales = recv_x
        out.update(recv_bytes=recv_fp8.view(torch.uint8), scales=scales.contiguous(), scales_stride=scales.stride())
        y = per_token_cast_back(recv_fp8.flatten(0, 1), scales.flatten(0, 1), torch.bfloat16).view(recv_fp8.shape)
    else:
        out["recv_x"] = recv_x
        y = recv_x.clone()
    slots = torch.arange(y.shape[1])[None, :]
    y[slots >= recv_count[:, None]] = float("nan")  # rows past the count must never be read
    out["expert_rows"] = [y[e, : recv_count[e]] for e in range(y.shape[0])]
    combined_x, event, hook = buffer.low_latency_combine(y, topk_idx, topk_weights, handle, **{k: v for k, v in mode.items() if k != "use_fp8"})
    hook() if hook is not None else event.current_stream_wait()
    out["combined_x"] = combined_x
    return out


def _run_ranks(rank, world_size, group):
    hint = Buffer.get_low_latency_rdma_size_hint(MAX_TOKENS, HIDDEN, world_size, NUM_EXPERTS)
    buffer = Buffer(group, 0, hint, low_latency_mode=True, num_qps_per_rank=NUM_EXPERTS // world_size)
    buffer.clean_low_latency_buffer(MAX_TOKENS, HIDDEN, NUM_EXPERTS)
    x, topk_idx, topk_weights = rank_inputs(rank, NUM_EXPERTS)
    topk_weights = topk_weights.abs()
    out = {}
    for name, mode in MODES.items():
        buffer.traffic.reset()
        static = "static" in name
        if static:  # the GPU path on the CPU: every slot, no counts read
            low_latency.static_shapes = lambda device: True
        try:
            out[name] = _round_trip(buffer, x, topk_idx, topk_weights, NUM_EXPERTS, **mode)
        finally:
            low_latency.static_shapes = static_shapes
        out[name]["traffic"] = buffer.traffic.intranode_bytes

    # combine straight after a dispatch whose hook was never called: the experts all output ones
    _, _, handle, _, _ = buffer.low_latency_dispatch(x, topk_idx, MAX_TOKENS, NUM_EXPERTS, return_recv_hook=True)
    ones = torch.ones(NUM_EXPERTS // world_size, world_size * MAX_TOKENS, HIDDEN, dtype=torch.bfloat16)
    out["combine before the hook"] = buffer.low_latency_combine(ones, topk_idx, topk_weights, handle)[0]

    too_small = Buffer(group, 0, hint - 1, low_latency_mode=True)
    out["errors"] = {
        "too many tokens": raised(lambda: buffer.low_latency_dispatch(torch.zeros(MAX_TOKENS + 1, HIDDEN, dtype=torch.bfloat16), torch.zeros(MAX_TOKENS + 1, 2, dtype=torch.int64), MAX_TOKENS, NUM_EXPERTS)),
        "fp8 hidden": raised(lambda: buffer.low_latency_dispatch(x[:, :100], topk_idx, MAX_TOKENS, NUM_EXPERTS)),
        "topk range": raised(lambda: buffer.low_latency_dispatch(torch.zeros(1, HIDDEN, dtype=torch.bfloat16), torch.tensor([[0, NUM_EXPERTS]]), MAX_TOKENS, NUM_EXPERTS)),
        "small buffer": raised(lambda: too_small.clean_low_latency_buffer(MAX_TOKENS, HIDDEN, NUM_EXPERTS)),
        "bf16 only": raised(lambda: buffer.low_latency_dispatch(x.float(), topk_idx, MAX_TOKENS, NUM_EXPERTS)),
    }
    big = Buffer(group, 0, int(1e8), low_latency_mode=True)
    out["disagree"] = raised(lambda: big.low_latency_dispatch(x, topk_idx, MAX_TOKENS + (rank == 0), NUM_EXPERTS))

    out["later arguments"] = _later_arguments(big, x, topk_idx, topk_weights, world_size)

    alone = [dist.new_group([r]) for r in range(world_size)][rank]
    out["alone"] = _round_trip(Buffer(alone, 0, int(1e8), low_latency_mode=True), x, topk_idx, topk_weights, NUM_EXPERTS)

    subgroup = [dist.new_group(ranks) for ranks in SUBGROUPS][rank // 2]
    sub_buffer = Buffer(subgroup, 0, int(1e8), low_latency_mode=True)
    sub_x, sub_topk_idx, sub_topk_weights = subgroup_inputs(rank, SUBGROUP_EXPERTS)
    out["subgroup"] = _round_trip(sub_buffer, sub_x, sub_topk_idx, sub_topk_weights.abs(), SUBGROUP_EXPERTS)
    return out


def _later_arguments(buffer, x, topk_idx, topk_weights, world_size) -> dict:
    """Upstream's current low-latency arguments: power-of-two and UE8M0
    scales, receive statistics, zero-copy combine, an output tensor, LogFMT."""
    out = {}
    wide_x = torch.cat([x, x.flip(1)], dim=1)  # hidden 512: UE8M0 packs 4 scales of 128 channels in an int32
    stats = torch.zeros(NUM_EXPERTS // world_size, dtype=torch.int32)
    for name, flags in (("round_scale", {"round_scale": True}), ("ue8m0", {"round_scale": True, "use_ue8m0": True})):
        (recv_fp8, scales), count, handle, _, _ = buffer.low_latency_dispatch(
            wide_x, topk_idx, MAX_TOKENS, NUM_EXPERTS, cumulative_local_expert_recv_stats=stats, **flags
        )
        out[name] = {"bytes": recv_fp8.view(torch.uint8), "scales": scales.clone(), "stride": scales.stride(), "count": count}
    out["stats"] = stats
    recv_x, count, handle, _, _ = buffer.low_latency_dispatch(x, topk_idx, MAX_TOKENS, NUM_EXPERTS, use_fp8=False)
    plain = buffer.low_latency_combine(recv_x, topk_idx, topk_weights, handle)[0]
    buffer.get_next_low_latency_combine_buffer(handle).copy_(recv_x)
    given = torch.empty(x.shape, dtype=torch.bfloat16)
    zero_copy = buffer.low_latency_combine(torch.zeros_like(recv_x), topk_idx, topk_weights, handle, use_logfmt=True, zero_copy=True, out=given)[0]
    out["combine"] = {"plain": plain, "zero copy": zero_copy, "into out": zero_copy is given}
    out["errors"] = {
        "ue8m0 without round_scale": raised(lambda: buffer.low_latency_dispatch(wide_x, topk_idx, MAX_TOKENS, NUM_EXPERTS, use_ue8m0=True)),
        "ue8m0 hidden 256": raised(lambda: buffer.low_latency_dispatch(x, topk_idx, MAX_TOKENS, NUM_EXPERTS, round_scale=True, use_ue8m0=True)),
        "stats dtype": raised(lambda: buffer.low_latency_dispatch(x, topk_idx, MAX_TOKENS, NUM_EXPERTS, cumulative_local_expert_recv_stats=stats.long())),
    }
    return out


@pytest.fixture(scope="module")
def ranks(all_ranks):
    return [result["low_latency"] for result in all_ranks]


def _check_round_trip(results, xs, idxs, weights, num_experts, use_fp8):
    num_ranks, num_local = len(results), num_experts // len(results)
    want = reference.low_latency_dispatch(xs, idxs, num_experts)
    casts = [per_token_cast_to_fp8(x) for x in xs]
    for rank, got in enumerate(results):
        assert got["recv_count"].tolist() == want[rank]["recv_count"]
        for e in range(num_local):
            sources = want[rank]["sources"][e]
            count = len(sources)
            assert got["src_info"][e, :count].tolist() == [token for _, token in sources]
            assert torch.all(got["src_info"][e, count:] == -1)
            for src in range(num_ranks):  # (first slot << 32) | count of each source rank's rows
                begin = sum(1 for s, _ in sources if s < src)
                size = sum(1 for s, _ in sources if s == src)
                assert int(got["layout_range"][e, src]) == (begin << 32) | size
            for slot, (src, token) in enumerate(sources):
                if use_fp8:
                    assert torch.equal(got["recv_bytes"][e, slot], casts[src][0][token].view(torch.uint8))
                    assert torch.equal(got["scales"][e, slot], casts[src][1][token])
                else:
                    assert torch.equal(got["recv_x"][e, slot], xs[src][token])
    combined = reference.low_latency_combine([g["expert_rows"] for g in results], [w["sources"] for w in want], idxs, weights, num_experts)
    for rank, got in enumerate(results):
        assert not torch.isnan(got["combined_x"]).any()
        assert calc_diff(got["combined_x"].float(), combined[rank]) < 1e-5
        if use_fp8:  # upstream's check against the unquantised input
            reference_x = xs[rank].float() * weights[rank].masked_fill(idxs[rank] < 0, 0).sum(dim=1, keepdim=True)
            assert calc_diff(got["combined_x"].float(), reference_x) < 9e-4


@pytest.mark.parametrize("mode", list(MODES))
def test_round_trip_equals_the_reference(ranks, mode):
    xs, idxs, weights = all_inputs(range(NUM_RANKS), NUM_EXPERTS)
    weights = [w.abs() for w in weights]
    _check_round_trip([r[mode] for r in ranks], xs, idxs, weights, NUM_EXPERTS, use_fp8=MODES[mode].get("use_fp8", True))


def test_round_trip_on_two_rank_subgroups(ranks):
    for members in SUBGROUPS:
        xs, idxs, weights = all_inputs(members, SUBGROUP_EXPERTS, subgroup_inputs)
        _check_round_trip([ranks[r]["subgroup"] for r in members], xs, idxs, [w.abs() for w in weights], SUBGROUP_EXPERTS, True)


def test_round_trip_on_a_one_rank_group(ranks):  # expert parallelism of 1: every expert here
    for rank, result in enumerate(ranks):
        xs, idxs, weights = all_inputs([rank], NUM_EXPERTS)
        _check_round_trip([result["alone"]], xs, idxs, [w.abs() for w in weights], NUM_EXPERTS, use_fp8=True)


def test_combine_completes_a_dispatch_not_yet_received(ranks):
    _, idxs, weights = all_inputs(range(NUM_RANKS), NUM_EXPERTS)
    for rank, result in enumerate(ranks):
        want = weights[rank].abs().masked_fill(idxs[rank] < 0, 0.0).sum(dim=1, keepdim=True).expand(-1, HIDDEN)
        torch.testing.assert_close(result["combine before the hook"].float(), want, rtol=1e-2, atol=1e-2)


def test_static_layout_and_bytes(ranks):
    slots, scales = NUM_RANKS * MAX_TOKENS, HIDDEN // 128
    for result in ranks:
        got = result["fp8 hook"]
        assert got["recv_bytes"].shape == (NUM_EXPERTS // NUM_RANKS, slots, HIDDEN)
        assert got["scales_stride"] == (scales * slots, 1, slots)  # column-major in the last two dimensions
        # every rank sends its max_tokens rows to every other rank, and the rows and weights back
        dispatch = (NUM_RANKS - 1) * MAX_TOKENS * (HIDDEN + 4 * scales + NUM_EXPERTS)
        combine = (NUM_RANKS - 1) * MAX_TOKENS * (2 * HIDDEN + 4 * (NUM_EXPERTS // NUM_RANKS))
        assert got["traffic"] == dispatch + combine


def test_errors(ranks):
    expected_errors = {
        "too many tokens": ("ValueError", "x has 17 tokens, more than num_max_dispatch_tokens_per_rank (16)"),
        "fp8 hidden": ("ValueError", "must be divisible by 128 for FP8 dispatch"),
        "topk range": ("ValueError", "topk_idx must hold values in [0, 8) or -1; found 8"),
        "small buffer": ("ValueError", "more than its num_rdma_bytes"),
        "bf16 only": ("TypeError", "x must have dtype bfloat16"),
    }
    for result in ranks:
        check_errors(result["errors"], expected_errors)
        kind, message = result["disagree"]
        assert kind == "ValueError" and "disagree on num_max_dispatch_tokens_per_rank" in message


def test_power_of_two_and_ue8m0_scales(ranks):
    xs, idxs, _ = all_inputs(range(NUM_RANKS), NUM_EXPERTS)
    wide = [torch.cat([x, x.flip(1)], dim=1) for x in xs]
    want = reference.low_latency_dispatch(wide, idxs, NUM_EXPERTS)
    for rank, result in enumerate(ranks):
        later = result["later arguments"]
        rounded, packed = later["round_scale"], later["ue8m0"]
        assert packed["stride"] == (MAX_TOKENS * NUM_RANKS, 1, MAX_TOKENS * NUM_RANKS)  # int32 [experts, slots, 512 / 512], column-major
        for e, count in enumerate(want[rank]["recv_count"]):
            scales = rounded["scales"][e, :count]
            assert torch.equal(scales, torch.exp2(torch.log2(scales).round()))  # powers of two
            # UE8M0: the exponent byte of each float32 scale, four to an int32
            words = packed["scales"][e, :count]  # [count, 1]: hidden 512 has 4 scales, one int32
            exponents = torch.stack([(words >> (8 * b)) & 0xFF for b in range(4)], dim=-1).view(count, 4)
            assert torch.equal(exponents << 23, scales.view(torch.int32))
            values = per_token_cast_back(rounded["bytes"][e, :count].view(torch.float8_e4m3fn), scales, torch.float32)
            assert calc_diff(values, want[rank]["recv_x"][e].float()) < 1e-3
            assert torch.equal(packed["bytes"][e, :count], rounded["bytes"][e, :count])
        # two dispatches added their counts
        assert later["stats"].tolist() == [2 * c for c in want[rank]["recv_count"]]


def test_zero_copy_combine_into_out(ranks):
    for result in ranks:
        combine = result["later arguments"]["combine"]
        assert combine["into out"] and torch.equal(combine["zero copy"], combine["plain"])
        check_errors(
            result["later arguments"]["errors"],
            {
                "ue8m0 without round_scale": ("ValueError", "use_ue8m0=True needs round_scale=True"),
                "ue8m0 hidden 256": ("ValueError", "divisible by 512 for UE8M0 scales"),
                "stats dtype": ("TypeError", "cumulative_local_expert_recv_stats must have dtype int32"),
            },
        )
