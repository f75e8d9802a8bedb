"""The schedules as data: each rank's list, checked for completeness, against
DualPipe's README figure, and against bad arguments."""

from __future__ import annotations

from collections import Counter

import pytest

from dsinfra.dualpipe import schedule
from dsinfra.dualpipe.schedule import B, F, FB, RECV_B, RECV_F, SEND_B, SEND_F, W, Op


def compute_ops(ops) -> str:
    """Compute operations in a compact notation: F1.3, B0.2, W, F0.7&B1.3."""
    words = []
    for op in ops:
        if op.kind == FB:
            words.append(f"F{op.module}.{op.chunk}&B{op.backward[0]}.{op.backward[1]}")
        elif op.kind == W:
            words.append("W")
        elif op.kind in (F, B):
            words.append(f"{op.kind}{op.module}.{op.chunk}")
    return " ".join(words)


def test_dualpipev_matches_the_readme_figure():
    """Devices 0 and 1 of DualPipe's README figure for DualPipeV (4 ranks, 10
    micro-batches), transcribed cell by cell."""
    ops = schedule.dualpipev(4, 10).ops
    assert compute_ops(ops[0]) == (
        "F0.0 F0.1 F0.2 F0.3 F0.4 F0.5 F0.6 F1.0 B1.0 W F1.1 B1.1 W F1.2 B1.2 W F1.3 F0.7&B1.3 F1.4&B0.0 "
        "F0.8&B1.4 F1.5&B0.1 F0.9&B1.5 F1.6&B0.2 B1.6 F1.7&B0.3 B1.7 F1.8&B0.4 B1.8 F1.9&B0.5 "
        "B1.9 B0.6 W B0.7 W B0.8 W B0.9 W"
    )
    assert compute_ops(ops[1]) == (
        "F0.0 F0.1 F0.2 F0.3 F0.4 F1.0 F0.5 F1.1 B1.0 W F1.2 B1.1 W F1.3 F0.6&B1.2 F1.4&B0.0 F0.7&B1.3 "
        "F1.5&B0.1 F0.8&B1.4 F1.6&B0.2 F0.9&B1.5 F1.7&B0.3 B1.6 F1.8&B0.4 B1.7 F1.9&B0.5 "
        "B1.8 B0.6 B1.9 B0.7 W B0.8 W B0.9 W W"
    )


@pytest.mark.parametrize(
    "name, num_ranks, num_chunks",
    [("1f1b", 1, 1), ("1f1b", 4, 2), ("1f1b", 5, 11), ("zb1p", 3, 2), ("zb1p", 4, 9), ("dualpipe", 2, 4),
     ("dualpipe", 6, 14), ("dualpipev", 1, 2), ("dualpipev", 3, 7), ("dualpipev", 4, 12)],
)
def test_every_stage_runs_every_micro_batch_once(name, num_ranks, num_chunks):
    plan = schedule.build(name, num_ranks, num_chunks)
    layout = plan.layout
    chunks = plan.chunks_per_direction
    for rank, ops in enumerate(plan.ops):
        forwards, backwards, weights, zero_bubble = Counter(), Counter(), Counter(), Counter()
        sent, received = Counter(), Counter()
        for op in ops:
            if op.kind in (F, FB):
                forwards[op.module, op.chunk] += 1
            if op.kind in (B, FB):
                module, chunk = op.backward if op.kind == FB else (op.module, op.chunk)
                backwards[module, chunk] += 1
                zero_bubble[module, chunk] += op.zero_bubble
            if op.kind == W:
                weights[op.module, op.chunk] += 1
            if op.kind in (SEND_F, SEND_B):
                sent[op.kind, op.module, op.chunk] += 1
            if op.kind in (RECV_F, RECV_B):
                received[op.kind, op.module, op.chunk] += 1
        slots = [(m, c) for m in range(len(layout.stages[rank])) for c in range(chunks)]
        assert forwards == Counter(slots) and backwards == Counter(slots)
        assert weights == +zero_bubble  # one W per zero-bubble backward
        for module in range(len(layout.stages[rank])):
            following, previous = layout.neighbour(rank, module, +1), layout.neighbour(rank, module, -1)
            remote_next = following is not None and following[0] != rank
            remote_prev = previous is not None and previous[0] != rank
            for chunk in range(chunks):
                assert sent[SEND_F, module, chunk] == received[RECV_B, module, chunk] == remote_next
                assert sent[SEND_B, module, chunk] == received[RECV_F, module, chunk] == remote_prev


def test_layouts():
    dualpipe = schedule.dualpipe(4, 8).layout
    assert dualpipe.stages == (((0, 0), (1, 3)), ((0, 1), (1, 2)), ((0, 2), (1, 1)), ((0, 3), (1, 0)))
    assert dualpipe.neighbour(0, 1, +1) is None and dualpipe.neighbour(3, 1, +1) == (2, 1)
    v = schedule.dualpipev(3, 6).layout
    assert v.neighbour(2, 0, +1) == (2, 1)  # the V turns on the last rank
    assert v.is_first_stage(0, 0) and v.is_last_stage(0, 1) and not v.is_last_stage(1, 1)
    assert schedule.dualpipe(4, 8).chunks_per_direction == 4 and schedule.dualpipev(3, 6).chunks_per_direction == 6


def test_without_backward():
    plan = schedule.dualpipe(2, 4).without_backward()
    assert plan.forward_only
    assert all(op.kind in (F, SEND_F, RECV_F) for ops in plan.ops for op in ops)
    assert [op for op in plan.ops[0] if op.kind == F][:3] == [Op(F, 0, 0), Op(F, 1, 0), Op(F, 0, 1)]


def test_op_text():
    assert str(Op(FB, 0, 7, backward=(1, 3))) == "FB0.7+B1.3"
    assert str(Op(B, 1, 2, zero_bubble=True)) == "B1.2z"


@pytest.mark.parametrize(
    "name, num_ranks, num_chunks, error, message",
    [
        ("dualpipe", 3, 12, ValueError, "even number of ranks"),
        ("dualpipe", 4, 6, ValueError, "num_chunks even and >= 2 \\* num_ranks \\(8\\)"),
        ("dualpipe", 4, 9, ValueError, "num_chunks even"),
        ("dualpipev", 4, 7, ValueError, "num_chunks >= 2 \\* num_ranks \\(8\\)"),
        ("1f1b", 0, 4, ValueError, "num_ranks must be > 0; got 0"),
        ("zb1p", 2, 2.5, TypeError, "num_chunks must be an int"),
        ("gpipe", 2, 4, ValueError, "schedule must be one of 1f1b, zb1p, dualpipe, dualpipev"),
    ],
)
def test_bad_arguments(name, num_ranks, num_chunks, error, message):
    with pytest.raises(error, match=message):
        schedule.build(name, num_ranks, num_chunks)
