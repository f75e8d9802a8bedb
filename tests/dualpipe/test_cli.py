"""``python -m dsinfra schedule``: the summary, the picture, the Chrome trace, the comparison table, and its errors."""

from __future__ import annotations

import json

import pytest

from dsinfra import cli
from dsinfra.dualpipe import schedule
from dsinfra.dualpipe.simulator import Costs, simulate


def test_picture_trace_and_table(tmp_path, capsys):
    picture, trace = tmp_path / "dualpipe.png", tmp_path / "dualpipe.json"
    assert cli.main(["schedule", "dualpipe", "--ranks", "4", "--chunks", "10", "--out", str(picture), "--trace", str(trace), "--compare"]) == 0
    out = capsys.readouterr().out
    assert "dualpipe: 4 ranks, 10 micro-batches, makespan 32" in out  # 10 (F + B) + the bubble, (4/2 - 1)(F&B + B - 3W)
    assert "(PP/2-1)(F&B+B-3W)" in out and "dualpipev    2 (PP/2)" in out
    assert picture.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    events = json.loads(trace.read_text())["traceEvents"]
    slices = [e for e in events if e["ph"] == "X"]
    assert {e["tid"] for e in slices} == {0, 1, 2, 3}
    assert {e["cat"] for e in slices} == {"forward", "backward", "weight", "forward & backward"}
    assert all(e["dur"] > 0 for e in slices)


def test_cost_options(capsys):
    assert cli.main(["schedule", "1f1b", "--ranks", "3", "--chunks", "4", "--forward", "2", "--backward", "3", "--p2p", "0.5", "--rendezvous"]) == 0
    timeline = simulate(schedule.one_f_one_b(3, 4), Costs(forward=2, backward=3, p2p=0.5), rendezvous=True)
    assert f"makespan {timeline.makespan:g}" in capsys.readouterr().out


@pytest.mark.parametrize(
    "args, message",
    [
        (["dualpipe", "--ranks", "3"], "DualPipe needs an even number of ranks; got 3"),
        (["dualpipev", "--ranks", "4", "--chunks", "6"], "DualPipeV needs num_chunks >= 2 * num_ranks (8)"),
        (["zb1p", "--weight", "5"], "Costs.weight (5) must be <= Costs.backward (2)"),
        (["1f1b", "--ranks", "3", "--compare"], "--compare: pp must be even"),
    ],
)
def test_errors(args, message, capsys):
    assert cli.main(["schedule", *args]) == 2
    assert message in capsys.readouterr().err
