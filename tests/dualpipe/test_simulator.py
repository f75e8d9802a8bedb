"""The simulator reproduces DualPipe's README table, and rejects schedules
that cannot run."""

from __future__ import annotations

import dataclasses

import pytest

from dsinfra.dualpipe import schedule
from dsinfra.dualpipe.schedule import F, SEND_F, W, Op
from dsinfra.dualpipe.simulator import Costs, ScheduleError, bubble_formula, compare, format_comparison, num_stages, simulate

# Where the README's formulas are exact: B = F + W (the input-gradient part of a
# backward costs a forward), W <= F, and F&B = F + B (overlap saves nothing).
EXACT_COSTS = [Costs(1, 2, 1), Costs(2, 3, 1), Costs(1, 1.5, 0.5, 2.5)]


@pytest.mark.parametrize("costs", EXACT_COSTS)
@pytest.mark.parametrize("name", ["1f1b", "zb1p", "dualpipe", "dualpipev"])
def test_bubbles_equal_the_readme_formulas(name, costs):
    for num_ranks in (2, 4, 6, 8) if name != "dualpipev" else (1, 2, 3, 4, 8):
        pp = num_stages(name, num_ranks)
        for num_chunks in (2 * num_ranks, 2 * num_ranks + 6, 4 * num_ranks + 2):
            timeline = simulate(schedule.build(name, num_ranks, num_chunks), costs)
            expected = bubble_formula(name, pp, costs)
            assert timeline.bubble == pytest.approx([expected] * num_ranks), (num_ranks, num_chunks)


@pytest.mark.parametrize("name", ["dualpipe", "dualpipev"])
def test_dualpipe_bubbles_hold_when_sends_wait_for_receives(name):
    for num_ranks in (2, 4, 8):
        timeline = simulate(schedule.build(name, num_ranks, 2 * num_ranks + 4), Costs(), rendezvous=True)
        assert timeline.bubble == pytest.approx([bubble_formula(name, num_stages(name, num_ranks), Costs())] * num_ranks)


def test_one_f_one_b_bubble_holds_for_any_costs():
    costs = Costs(forward=1.3, backward=2.9, weight=0.4)
    timeline = simulate(schedule.one_f_one_b(5, 13), costs)
    assert timeline.bubble == pytest.approx([4 * (1.3 + 2.9)] * 5)


def test_every_schedule_runs_with_rendezvous_and_forward_only():
    for name, ranks, chunks in [("1f1b", 4, 9), ("zb1p", 4, 9), ("dualpipe", 4, 10), ("dualpipev", 3, 7)]:
        plan = schedule.build(name, ranks, chunks)
        for variant in (plan, plan.without_backward()):
            timeline = simulate(variant, Costs(p2p=0.25), rendezvous=True)
            for intervals in timeline.intervals:
                assert all(a.end <= b.start + 1e-12 for a, b in zip(intervals, intervals[1:]))
            assert timeline.makespan == max(i.end for rank in timeline.intervals for i in rank)


@pytest.mark.parametrize("pp", [8, 16])
def test_readme_table(pp):
    rows = {row.name: row for row in compare(pp, 2 * pp + 4)}
    assert {name: row.num_ranks for name, row in rows.items()} == {"1f1b": pp, "zb1p": pp, "dualpipe": pp, "dualpipev": pp // 2}
    assert {name: row.parameters for name, row in rows.items()} == {"1f1b": 1, "zb1p": 1, "dualpipe": 2, "dualpipev": 2}
    assert {name: row.activations for name, row in rows.items()} == {"1f1b": pp, "zb1p": pp, "dualpipe": pp + 1, "dualpipev": pp + 1}
    assert all(row.bubble == pytest.approx(row.formula_bubble) for row in rows.values())
    assert rows["dualpipe"].bubble < rows["zb1p"].bubble < rows["1f1b"].bubble
    text = format_comparison(list(rows.values()), pp, 2 * pp + 4, Costs())
    assert "(PP/2-1)(F&B+B-3W)" in text and f"{pp + 1} (PP+1)" in text


def test_p2p_latency_lengthens_the_step():
    plan = schedule.dualpipe(4, 8)
    assert simulate(plan, Costs(p2p=0.5)).makespan > simulate(plan, Costs()).makespan


def _with_ops(plan, rank, ops):
    return dataclasses.replace(plan, ops=tuple(tuple(ops) if r == rank else o for r, o in enumerate(plan.ops)))


def test_broken_schedules_are_rejected():
    plan = schedule.one_f_one_b(2, 2)
    rank0 = list(plan.ops[0])
    # rank 0 waits for a gradient before sending the forward that produces it
    waits_first = [rank0[4]] + rank0[:4] + rank0[5:]
    with pytest.raises(ScheduleError, match="deadlocks"):
        simulate(_with_ops(plan, 0, waits_first))
    # rank 0 sends micro-batch 1 before micro-batch 0
    assert [str(op) for op in rank0[:4]] == ["F0.0", "SEND_F0.0", "F0.1", "SEND_F0.1"]
    swapped = [rank0[0], rank0[2], rank0[3], rank0[1]] + rank0[4:]
    with pytest.raises(ScheduleError, match="crosses"):
        simulate(_with_ops(plan, 0, swapped))
    # rank 1 computes before receiving
    with pytest.raises(ScheduleError, match="before its input arrived"):
        simulate(_with_ops(plan, 1, plan.ops[1][1:]))
    # a send of something never computed
    with pytest.raises(ScheduleError, match="not computed yet"):
        simulate(_with_ops(plan, 0, [Op(SEND_F, 0, 0)] + rank0))
    # weight parts out of order
    zb = schedule.zb1p(1, 2)
    reordered = [op for op in zb.ops[0] if op.kind != W] + [Op(W, 0, 1), Op(W, 0, 0)]
    with pytest.raises(ScheduleError, match="not the oldest"):
        simulate(_with_ops(zb, 0, reordered))
    # a forward with no backward
    with pytest.raises(ScheduleError, match="unfinished"):
        simulate(_with_ops(zb, 0, [Op(F, 0, 0), Op(F, 0, 1)]))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"forward": -1}, "forward must be finite and >= 0"),
        ({"weight": 3}, "weight \\(3\\) must be <= Costs.backward"),
        ({"overlapped": -2}, "overlapped"),
        ({"backward": float("nan")}, "backward must be finite and >= 0; got nan"),
        ({"p2p": float("inf")}, "p2p must be finite and >= 0; got inf"),
    ],
)
def test_bad_costs(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Costs(**kwargs)
