"""Normal-mode dispatch and combine within one node, on 4 ranks (the world) and
on 2-rank subgroups, held against the single-process reference: the checks
DeepEP's test_intranode.py makes, plus argument errors that must reach every
rank. One spawn runs every rank's side; the tests inspect what came back."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from dsinfra.deep_ep import Buffer, Config, EventHandle, EventOverlap, reference, threads
from dsinfra.fp8 import per_token_cast_back, per_token_cast_to_fp8
from dsinfra.testing import calc_diff, randn
from tests.deep_ep.helpers import (
    HIDDEN,
    NUM_RANKS,
    NUM_TOPK,
    TOKENS,
    WORLD_EXPERTS,
    all_inputs,
    check_errors,
    dispatch_and_wait,
    layout_kwargs,
    raised,
    rank_inputs,
    subgroup_inputs,
)

NUM_EXPERTS = WORLD_EXPERTS
SUBGROUPS, SUBGROUP_EXPERTS = ([0, 1], [2, 3]), 4


def _run_ranks(rank, world_size, group):
    buffer = Buffer(group, num_nvl_bytes=int(1e8))
    x, topk_idx, topk_weights = rank_inputs(rank, NUM_EXPERTS)
    layout = layout_kwargs(buffer, topk_idx, NUM_EXPERTS)
    topk = {"topk_idx": topk_idx, "topk_weights": topk_weights}
    x_fp8, scales = per_token_cast_to_fp8(x)
    x_fp8 = (x_fp8, scales.T.contiguous().T)  # column-major scales, as upstream's test passes them
    out = {"layout": {k: v for k, v in layout.items()}}

    out["bf16"] = dispatch_and_wait(buffer, x, **layout, **topk)
    out["fp8"] = dispatch_and_wait(buffer, x_fp8, **layout, **topk)
    out["bf16 async"] = dispatch_and_wait(buffer, x, **layout, **topk, async_finish=True)
    out["fp8 async, previous event"] = dispatch_and_wait(buffer, x_fp8, **layout, **topk, async_finish=True, previous_event=Buffer.capture())
    out["fp32"] = dispatch_and_wait(buffer, x.float(), **layout, **topk, config=Buffer.get_dispatch_config(world_size))
    out["no top-k, aligned"] = dispatch_and_wait(buffer, x, **layout, expert_alignment=4)
    handle = out["bf16"]["handle"]
    out["cached"] = dispatch_and_wait(buffer, x, handle=handle)
    out["cached fp8 async"] = dispatch_and_wait(buffer, x_fp8, handle=handle, async_finish=True)

    rows, weights = out["bf16"]["recv_x"], out["bf16"]["recv_topk_weights"]
    combined = {}
    for name, kwargs in (("sync", {}), ("async", {"async_finish": True, "previous_event": Buffer.capture()})):
        combined_x, combined_weights, event = buffer.combine(rows, handle, topk_weights=weights, **kwargs)
        with event:
            pass
        combined[name] = (combined_x, combined_weights)
    fp8_rows, fp8_scales = out["fp8"]["recv_x"]
    combined["fp8 rows"] = buffer.combine(per_token_cast_back(fp8_rows.view(torch.float8_e4m3fn), fp8_scales, torch.bfloat16), handle)[0]
    out["combine"] = combined

    buffer.traffic.reset()
    dispatch_and_wait(buffer, x, **layout, **topk)
    out["traffic"] = (buffer.traffic.intranode_bytes, buffer.traffic.internode_bytes)

    # Errors: every rank makes the same calls, so none is left waiting.
    narrow = x[:, :128].contiguous() if rank == 0 else x
    out["disagree"] = raised(lambda: buffer.dispatch(narrow, **layout))
    bad_topk = topk_idx.clone()
    if rank == 2:
        bad_topk[3, 1] = NUM_EXPERTS
    out["bad topk"] = raised(lambda: buffer.dispatch(x, **layout, topk_idx=bad_topk, topk_weights=topk_weights))
    wrong_counts = dict(layout, num_tokens_per_rank=layout["num_tokens_per_rank"] + (rank == 1))
    out["wrong counts"] = raised(lambda: buffer.dispatch(x, **wrong_counts))
    small = Buffer(group, num_nvl_bytes=1000)
    out["small buffer"] = raised(lambda: small.dispatch(x, **layout))
    out["local errors"] = {
        "int32 topk_idx": raised(lambda: buffer.dispatch(x, **layout, topk_idx=topk_idx.int(), topk_weights=topk_weights)),
        "missing layout": raised(lambda: buffer.dispatch(x, num_tokens_per_rank=layout["num_tokens_per_rank"])),
        "fp8 hidden 100": raised(lambda: buffer.dispatch((x_fp8[0][:, :100], x_fp8[1]), **layout)),
        "weights without ids": raised(lambda: buffer.dispatch(x, **layout, topk_weights=topk_weights)),
        "cached with top-k": raised(lambda: buffer.dispatch(x, handle=handle, **topk)),
        "layout experts % ranks": raised(lambda: buffer.get_dispatch_layout(topk_idx, 6)),
        "layout range": raised(lambda: buffer.get_dispatch_layout(torch.tensor([[0, NUM_EXPERTS]]), NUM_EXPERTS)),
        "combine rows": raised(lambda: buffer.combine(rows[:-1] if len(rows) else rows[:0, :1], handle)),
        "low latency off": raised(lambda: buffer.low_latency_dispatch(x, topk_idx, 16, NUM_EXPERTS)),
        "config": raised(lambda: Config(20, 8, 8)),
        "set_num_sms": raised(lambda: Buffer.set_num_sms(3)),
        "group": raised(lambda: Buffer(None)),
    }

    out["later arguments"] = _later_arguments(rank, group, buffer, x, topk_idx, topk_weights, layout, handle)
    out["threads in a call"] = _threads_in_a_call(group, x, layout)
    out["every rank raises"] = _every_rank_raises(rank, group, buffer, x, topk_idx, topk_weights, layout, rows, handle)

    subgroups = [dist.new_group(ranks) for ranks in SUBGROUPS]
    subgroup = subgroups[rank // 2]
    sub_buffer = Buffer(subgroup, num_nvl_bytes=int(1e8))
    sub_x, sub_topk_idx, sub_topk_weights = subgroup_inputs(rank, SUBGROUP_EXPERTS)
    sub = dispatch_and_wait(
        sub_buffer, sub_x, **layout_kwargs(sub_buffer, sub_topk_idx, SUBGROUP_EXPERTS), topk_idx=sub_topk_idx, topk_weights=sub_topk_weights
    )
    sub["combined"] = sub_buffer.combine(sub["recv_x"], sub["handle"])[0]
    out["subgroup"] = sub
    return out


def _later_arguments(rank, group, buffer, x, topk_idx, topk_weights, layout, handle) -> dict:
    """What upstream's current Buffer adds: num_worst_tokens, combine's bias,
    destroy, and the arguments accepted or refused off NVLink."""
    out = {"handle": (len(handle), type(handle).__name__), "sm90": Buffer.is_sm90_compiled()}
    worst = sum(TOKENS)  # every token of every rank
    out["worst"] = dispatch_and_wait(buffer, x, **layout, topk_idx=topk_idx, topk_weights=topk_weights, num_worst_tokens=worst)
    rows = out["worst"]["recv_x"].clone()
    num_recv = int(out["worst"]["handle"][0][-1, rank])
    rows[num_recv:] = float("nan")  # rows past those received are never read
    out["worst combine"] = buffer.combine(rows, out["worst"]["handle"])[0]
    out["worst cached"] = dispatch_and_wait(buffer, x, handle=out["worst"]["handle"])["recv_x"]
    out["worst too small"] = raised(lambda: buffer.dispatch(x, **layout, num_worst_tokens=1))
    bias = (torch.ones(x.shape, dtype=torch.bfloat16), randn(*x.shape, seed=300 + rank, dtype=torch.bfloat16))
    recv_x = dispatch_and_wait(buffer, x, handle=handle)["recv_x"]
    out["bias"] = (bias, buffer.combine(recv_x, handle, bias=bias)[0], buffer.combine(recv_x, handle, bias=bias[0])[0])
    accepting = Buffer(group, int(1e8), 0, False, 1, False, True, True, False)  # allow_mnnvl=True, explicitly_destroy=True
    accepting.destroy()
    out["destroyed"] = (raised(lambda: accepting.dispatch(x, **layout)), raised(accepting.destroy))
    out["refused"] = {
        "destroy without explicitly_destroy": raised(buffer.destroy),
        "enable_shrink": raised(lambda: Buffer(group, int(1e8), enable_shrink=True)),
        "comm": raised(lambda: Buffer(None, int(1e8), comm=object())),
        "wait stats": raised(lambda: Buffer(group, 0, int(1e8), low_latency_mode=True).low_latency_dispatch(
            x, topk_idx, 16, NUM_EXPERTS, dispatch_wait_recv_cost_stats=torch.zeros(4, 4, dtype=torch.int64))),
    }
    return out


def _threads_in_a_call(group, x, layout) -> tuple[list[int], int, int]:
    """With every rank at torch's default (a thread per core), the 4 ranks
    oversubscribe the cores: a call's work runs with the fair share."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads.num_cores())
    try:
        crowded = Buffer(group, int(1e8))
        seen = []
        inside = EventOverlap(EventHandle(finish=lambda: seen.append(torch.get_num_threads())))  # completed inside the call
        crowded.dispatch(x, **layout, previous_event=inside)
        return seen, torch.get_num_threads(), threads.num_cores()
    finally:
        torch.set_num_threads(before)


def _every_rank_raises(rank, group, buffer, x, topk_idx, topk_weights, layout, rows, handle) -> dict:
    """One rank's arguments are wrong, or the ranks disagree: every rank raises
    (the rank at fault its own error, the others naming it), none aborts."""
    topk = {"topk_idx": topk_idx, "topk_weights": topk_weights}
    out = {}
    experts = 16 if rank == 0 else NUM_EXPERTS
    out["num_experts 16 vs 8"] = raised(lambda: buffer.dispatch(x, **layout_kwargs(buffer, topk_idx, experts), **topk))
    per_expert = torch.zeros(6, dtype=torch.int32) if rank == 1 else layout["num_tokens_per_expert"]  # 6 experts do not divide over 4 ranks
    out["num_experts 6"] = raised(lambda: buffer.dispatch(x, **dict(layout, num_tokens_per_expert=per_expert), **topk))
    counts = layout["num_tokens_per_expert"].clone()
    if rank == 1:
        counts[0] += 1
    out["expert counts contradict topk_idx"] = raised(lambda: buffer.dispatch(x, **dict(layout, num_tokens_per_expert=counts), **topk))
    in_rank = layout["is_token_in_rank"].clone()
    if rank == 2:  # token 0 loses the rank of its first expert; the counts follow is_token_in_rank
        in_rank[0, int(topk_idx[0][topk_idx[0] >= 0][0]) // (NUM_EXPERTS // NUM_RANKS)] = False
    left_out = dict(layout, is_token_in_rank=in_rank, num_tokens_per_rank=in_rank.sum(dim=0, dtype=torch.int32))
    out["is_token_in_rank leaves out a rank"] = raised(lambda: buffer.dispatch(x, **left_out, **topk))
    out["num_nvl_bytes 2**63"] = raised(lambda: Buffer(group, num_nvl_bytes=2**63 if rank == 3 else int(1e8)))
    out["combine dtype"] = raised(lambda: buffer.combine(rows.float() if rank == 0 else rows, handle))
    return out


@pytest.fixture(scope="module")
def ranks(all_ranks):
    return [result["intranode"] for result in all_ranks]


def test_layout_equals_a_plain_count(ranks, expected):
    _, idxs, _ = expected["inputs"]
    for rank, result in enumerate(ranks):
        per_rank, per_rdma_rank, per_expert, in_rank = reference.get_dispatch_layout(idxs[rank], NUM_EXPERTS, NUM_RANKS, 1)
        layout = result["layout"]
        assert torch.equal(layout["num_tokens_per_rank"], per_rank)
        assert layout["num_tokens_per_rdma_rank"] is None and per_rdma_rank is None
        assert torch.equal(layout["num_tokens_per_expert"], per_expert)
        assert torch.equal(layout["is_token_in_rank"], in_rank)


@pytest.mark.parametrize("case", ["bf16", "bf16 async", "fp32"])
def test_dispatch_delivers_each_token_once_per_rank_in_rank_order(ranks, expected, case):
    for rank, result in enumerate(ranks):
        want, got = expected["dispatch"][rank], result[case]
        assert torch.equal(got["recv_x"].to(want["recv_x"].dtype), want["recv_x"])
        assert torch.equal(got["recv_topk_idx"], want["recv_topk_idx"])
        assert torch.equal(got["recv_topk_weights"], want["recv_topk_weights"])
        assert got["counts"] == want["num_recv_tokens_per_expert"]
        assert torch.equal(got["handle"][0], want["rank_prefix_matrix"])
        # upstream's checks: per-expert counts match the received ids
        for expert, count in enumerate(got["counts"]):
            assert int((got["recv_topk_idx"] == expert).sum()) == count
    assert any(count == 0 for result in ranks for count in result["bf16"]["counts"])  # an empty expert was covered


@pytest.mark.parametrize("case", ["fp8", "fp8 async, previous event"])
def test_fp8_dispatch_delivers_the_exact_bytes(ranks, expected, case):
    xs, _, _ = expected["inputs"]
    casts = [per_token_cast_to_fp8(x) for x in xs]
    for rank, result in enumerate(ranks):
        want, got = expected["dispatch"][rank], result[case]
        assert got["dtypes"] == [torch.float8_e4m3fn, torch.float32]
        recv_fp8, recv_scales = got["recv_x"]  # the FP8 rows as bytes
        assert recv_fp8.shape == (len(want["sources"]), HIDDEN) and recv_scales.shape == (len(want["sources"]), HIDDEN // 128)
        for row, (src, token) in enumerate(want["sources"]):
            assert torch.equal(recv_fp8[row], casts[src][0][token].view(torch.uint8))
            assert torch.equal(recv_scales[row], casts[src][1][token])
        assert torch.equal(got["recv_topk_idx"], want["recv_topk_idx"])


def test_dispatch_without_topk_rounds_counts_to_the_alignment(ranks, expected):
    for rank, result in enumerate(ranks):
        got, want = result["no top-k, aligned"], expected["dispatch"][rank]
        assert got["recv_topk_idx"] is None and got["recv_topk_weights"] is None
        assert torch.equal(got["recv_x"], want["recv_x"])
        assert got["counts"] == [-(-c // 4) * 4 for c in want["num_recv_tokens_per_expert"]]


def test_cached_dispatch_reuses_the_layout(ranks, expected):
    for rank, result in enumerate(ranks):
        want = expected["dispatch"][rank]
        assert result["cached"]["handle"] is None and result["cached"]["counts"] is None
        assert torch.equal(result["cached"]["recv_x"], want["recv_x"])
        fp8, scales = result["cached fp8 async"]["recv_x"]
        assert torch.equal(fp8, result["fp8"]["recv_x"][0])
        assert torch.equal(scales, result["fp8"]["recv_x"][1])


def test_combine_sums_what_every_rank_sends_back(ranks, expected):
    xs, idxs, weights = expected["inputs"]
    want = reference.combine(
        [r["bf16"]["recv_x"] for r in ranks], [d["sources"] for d in expected["dispatch"]], [len(x) for x in xs]
    )
    for rank, result in enumerate(ranks):
        destinations = result["layout"]["is_token_in_rank"].sum(dim=1, keepdim=True).clamp(min=1)
        for name in ("sync", "async"):
            combined_x, combined_weights = result["combine"][name]
            assert combined_x.dtype == torch.bfloat16
            assert calc_diff(combined_x.float(), want[rank]) < 1e-5
            # upstream's round trip: divided by the number of ranks each token went to, the input comes back
            sent = destinations.squeeze(1) > 0
            assert calc_diff(combined_x[sent].float() / destinations[sent], xs[rank][sent].float()) < 5e-6
            assert torch.equal(combined_weights, weights[rank].masked_fill(idxs[rank] < 0, 0.0))
            assert torch.all(combined_x[~sent] == 0)
        fp8_rows = result["combine"]["fp8 rows"]
        assert calc_diff(fp8_rows[sent].float() / destinations[sent], xs[rank][sent].float()) < 1e-3


def test_bytes_sent_are_one_copy_per_token_per_destination_rank(ranks, expected):
    row_bytes = HIDDEN * 2 + NUM_TOPK * (8 + 4)
    for rank, result in enumerate(ranks):
        in_rank = result["layout"]["is_token_in_rank"].clone()
        in_rank[:, rank] = False  # rows a rank keeps are not sent
        assert result["traffic"] == (int(in_rank.sum()) * row_bytes, 0)


def test_ranks_that_disagree_on_hidden_all_raise(ranks):
    for result in ranks:
        kind, message = result["disagree"]
        assert kind == "ValueError" and "disagree on hidden" in message and "rank 0: 128" in message


def test_bad_input_on_one_rank_stops_every_rank(ranks):
    for rank, result in enumerate(ranks):
        kind, message = result["bad topk"]
        if rank == 2:
            assert kind == "ValueError" and "topk_idx must hold values in [0, 8) or -1; found 8" in message
        else:
            assert kind == "RuntimeError" and "rank 2 rejected its arguments" in message
        kind, message = result["wrong counts"]
        if rank == 1:
            assert kind == "ValueError" and "num_tokens_per_rank" in message
        else:
            assert kind == "RuntimeError" and "rank 1 rejected" in message


def test_a_buffer_too_small_raises_on_every_rank(ranks):
    messages = {result["small buffer"] for result in ranks}
    assert len(messages) == 1  # the same verdict everywhere
    kind, message = messages.pop()
    assert kind == "ValueError" and "num_nvl_bytes (1000)" in message and "create the Buffer with num_nvl_bytes >=" in message


def test_argument_errors_name_the_argument(ranks):
    expected_errors = {
        "int32 topk_idx": ("TypeError", "topk_idx must have dtype int64"),
        "missing layout": ("ValueError", "needs is_token_in_rank, num_tokens_per_expert"),
        "fp8 hidden 100": ("ValueError", "divisible by 128"),
        "weights without ids": ("ValueError", "topk_idx and topk_weights go together"),
        "cached with top-k": ("ValueError", "takes no topk_idx"),
        "layout experts % ranks": ("ValueError", "num_experts (6) must be divisible by the number of ranks (4)"),
        "layout range": ("ValueError", "topk_idx must hold values in [0, 8) or -1; found 8"),
        "combine rows": ("ValueError", "x must have shape"),
        "low latency off": ("ValueError", "low_latency_mode=True"),
        "config": ("ValueError", "num_max_nvl_chunked_send_tokens (8) must be < num_max_nvl_chunked_recv_tokens (8)"),
        "set_num_sms": ("ValueError", "new_num_sms (3) must be divisible by 2"),
        "group": ("TypeError", "group must be a torch.distributed.ProcessGroup"),
    }
    for result in ranks:
        check_errors(result["local errors"], expected_errors)


def test_two_rank_subgroups(ranks):
    for members in SUBGROUPS:
        xs, idxs, weights = all_inputs(members, SUBGROUP_EXPERTS, subgroup_inputs)
        want = reference.dispatch(xs, idxs, weights, SUBGROUP_EXPERTS)
        combined = reference.combine([ranks[r]["subgroup"]["recv_x"] for r in members], [w["sources"] for w in want], [len(x) for x in xs])
        for i, r in enumerate(members):
            got = ranks[r]["subgroup"]
            assert torch.equal(got["recv_x"], want[i]["recv_x"])
            assert torch.equal(got["recv_topk_idx"], want[i]["recv_topk_idx"])
            assert torch.equal(got["handle"][0], want[i]["rank_prefix_matrix"])
            assert calc_diff(got["combined"].float(), combined[i]) < 1e-5


def test_num_worst_tokens_pads_to_a_fixed_count(ranks, expected):
    worst = sum(TOKENS)
    for rank, result in enumerate(ranks):
        got, want = result["later arguments"]["worst"], expected["dispatch"][rank]
        num_recv = len(want["sources"])
        assert got["counts"] == []  # upstream: no per-expert list without a host sync
        assert got["recv_x"].shape[0] == got["recv_topk_idx"].shape[0] == got["recv_topk_weights"].shape[0] == worst
        assert torch.equal(got["recv_x"][:num_recv], want["recv_x"]) and torch.all(got["recv_x"][num_recv:] == 0)
        assert torch.equal(got["recv_topk_idx"][:num_recv], want["recv_topk_idx"])
        assert torch.all(got["recv_topk_idx"][num_recv:] == -1) and torch.all(got["recv_topk_weights"][num_recv:] == 0)
        cached = result["later arguments"]["worst cached"]
        assert cached.shape[0] == worst and torch.equal(cached[:num_recv], want["recv_x"])
        kind, message = result["later arguments"]["worst too small"]
        assert kind == "ValueError" and "more than its num_worst_tokens (1)" in message


def test_combine_of_padded_rows_reads_only_those_received(ranks, expected):
    xs, _, _ = expected["inputs"]
    want = reference.combine(
        [r["later arguments"]["worst"]["recv_x"][: len(d["sources"])] for r, d in zip(ranks, expected["dispatch"])],
        [d["sources"] for d in expected["dispatch"]],
        [len(x) for x in xs],
    )
    for rank, result in enumerate(ranks):
        combined = result["later arguments"]["worst combine"]
        assert not torch.isnan(combined).any()
        assert calc_diff(combined.float(), want[rank]) < 1e-5


def test_combine_adds_the_bias(ranks, expected):
    xs, _, _ = expected["inputs"]
    want = reference.combine([r["bf16"]["recv_x"] for r in ranks], [d["sources"] for d in expected["dispatch"]], [len(x) for x in xs])
    for rank, result in enumerate(ranks):
        (bias_0, bias_1), both, one = result["later arguments"]["bias"]
        assert calc_diff(both.float(), want[rank] + bias_0.float() + bias_1.float()) < 1e-5
        assert calc_diff(one.float(), want[rank] + bias_0.float()) < 1e-5


def test_upstream_handle_and_buffer_arguments(ranks):
    for result in ranks:
        later = result["later arguments"]
        assert later["handle"] == (6, "IntranodeHandle") and later["sm90"] is True
        (kind, message), (kind_again, _) = later["destroyed"]
        assert kind == kind_again == "RuntimeError" and "destroyed" in message
        check_errors(
            later["refused"],
            {
                "destroy without explicitly_destroy": ("RuntimeError", "explicitly_destroy=True"),
                "enable_shrink": ("ValueError", "enable_shrink=True"),
                "comm": ("ValueError", "mpi4py"),
                "wait stats": ("ValueError", "dispatch_wait_recv_cost_stats is not supported"),
            },
        )


@pytest.mark.parametrize(
    "case, culprit, message",
    [
        ("num_experts 16 vs 8", None, "the ranks disagree on num_experts (rank 0: 16, rank 1: 8, rank 2: 8, rank 3: 8)"),
        ("num_experts 6", 1, "num_tokens_per_expert.shape[0] (6) must be divisible by the number of ranks (4)"),
        ("expert counts contradict topk_idx", 1, "num_tokens_per_expert does not match topk_idx: expert 0"),
        ("is_token_in_rank leaves out a rank", 2, "is_token_in_rank leaves out rank"),
        ("num_nvl_bytes 2**63", 3, "num_nvl_bytes must be in [0, 2**63); got 9223372036854775808"),
        ("combine dtype", None, "combine: the ranks disagree on x dtype (rank 0: float32, rank 1: bfloat16"),
    ],
)
def test_every_rank_raises_the_same_error(ranks, case, culprit, message):
    for rank, result in enumerate(ranks):
        kind, text = result["every rank raises"][case]
        if culprit is None or rank == culprit:
            assert kind == "ValueError" and message in text, (rank, kind, text)
        else:
            assert kind == "RuntimeError" and f"rank {culprit} rejected its arguments" in text, (rank, kind, text)


def test_calls_share_the_cores_when_the_ranks_oversubscribe_them(ranks):
    for result in ranks:
        seen, after, cores = result["threads in a call"]
        assert seen == [max(1, cores // NUM_RANKS)]  # the fair share inside the call
        assert after == cores  # torch's setting is back afterwards
