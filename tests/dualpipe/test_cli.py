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
        (["dualpipev", "--ranks", "4", "--chunks", "6"], "DualPipeV needs --chunks >= 2 * --ranks (8)"),
        (["zb1p", "--weight", "5"], "--weight (5) must be <= --backward (2)"),
        (["1f1b", "--ranks", "3", "--compare"], "--compare: pp must be even"),
        (["1f1b", "--chunks", "0"], "--chunks must be >= 1; got 0"),
        (["1f1b", "--forward", "nan"], "--forward must be finite and >= 0; got nan"),
        (["1f1b", "--backward", "inf"], "--backward must be finite and >= 0; got inf"),
        (["1f1b", "--overlapped", "nan"], "--overlapped must be finite and >= 0; got nan"),
        (["1f1b", "--ranks", "100000"], "--ranks must be <= 64, the most the simulator takes; got 100000"),
        (["dualpipe", "--ranks", "64", "--chunks", "256"], "--ranks x --chunks must be <= 8192, the most the simulator takes"),
        (["dualpipe", "--ranks", "40", "--chunks", "80", "--out", "x.png"], "--out: a picture holds at most 32 ranks; got --ranks 40"),
        (["dualpipev", "--ranks", "64", "--chunks", "128", "--compare"], "--compare: pp must be <= 64, the most the simulator takes; got 128"),
    ],
)
def test_errors(args, message, capsys):
    assert cli.main(["schedule", *args]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


@pytest.mark.parametrize("flag, name", [("--out", "missing/x.png"), ("--out", "x.bmpx"), ("--trace", "missing/x.json"), ("--trace", ".")])
def test_output_paths_are_checked_before_the_simulation(flag, name, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("dsinfra.dualpipe.simulator.simulate", lambda *a, **k: pytest.fail("simulated before checking " + flag))
    assert cli.main(["schedule", "dualpipe", flag, name]) == 2
    assert f"{flag} {name}: " in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # the check leaves nothing behind


def test_a_picture_too_wide_to_read_is_refused(tmp_path, capsys):
    assert cli.main(["schedule", "1f1b", "--ranks", "4", "--chunks", "80", "--out", str(tmp_path / "wide.png")]) == 2
    assert "a picture holds at most 32 ranks and 200 time units" in capsys.readouterr().err
    assert not (tmp_path / "wide.png").exists()
