"""``python -m dsinfra demo``: the whole path end to end (--quick), Ctrl-C, its
console output, and bad input."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from dsinfra import cli
from dsinfra.demo import outputs


def demo(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "dsinfra", "demo", *args], capture_output=True, text=True, timeout=timeout)


def test_quick_demo_end_to_end(tmp_path):
    done = demo("--quick", "--out", str(tmp_path))
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    for name in summary["files"].values():
        assert (tmp_path / name).stat().st_size > 0, name
    for trace in ("trace_train_step.json", "trace_decode_step.json", "trace_pipeline_step.json"):
        assert json.loads((tmp_path / trace).read_text())["traceEvents"], trace
    training = summary["training"]
    assert training["last_loss"] < training["first_loss"]
    assert len(summary["serving"]) == 2  # the expert-parallel ranks serve
    for served in summary["serving"]:
        assert served["logits_calc_diff"] < 1e-3  # FP8 dispatch and a bf16 cache against float32 full attention
        assert served["token_agreement"] >= 0.9
    balancing = summary["balancing"]
    assert len(balancing["planned_max_over_mean"]["after"]) == 3  # every MoE layer
    assert all(a <= b + 1e-9 for a, b in zip(balancing["planned_max_over_mean"]["after"], balancing["planned_max_over_mean"]["before"]))
    assert "training: loss" in done.stdout and "load balancing" in done.stdout
    assert (tmp_path / "summary.txt").read_text() == done.stdout  # the summary, printed and kept
    assert "USDT" not in done.stderr and "profiler_start" not in done.stderr  # the profiler's own lines stay off the console
    assert " left" in done.stderr and "12/12" in done.stderr


@pytest.mark.parametrize(
    "args, message",
    [
        (["--ranks", "4", "--pp", "1", "--ep", "2"], "--pp x --ep (1 x 2 = 2) must equal the number of ranks (4)"),
        (["--pp", "3", "--ep", "1"], "needs 6 stages"),
        (["--pp", "1", "--ep", "3"], "do not split over 3 expert-parallel ranks"),
        (["--steps", "0"], "--steps must be >= 1"),
        (["--ranks", "0"], "--ranks must be >= 1; got 0"),
        (["--pp", "0"], "--pp must be >= 1; got 0"),
        (["--quick", "--seed", "99999999999999999999"], "--seed must be in 0 to 4294967295; got 99999999999999999999"),
        (["--seed", "-1"], "--seed must be in 0 to 4294967295; got -1"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(args, message, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("dsinfra.testing.spawn", lambda *a, **k: pytest.fail("started ranks on bad input"))
    assert cli.main(["demo", *args, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err and "torchrun" not in err


def test_unwritable_out(tmp_path):
    blocked = tmp_path / "file"
    blocked.write_text("")
    done = demo("--out", str(blocked / "sub"), timeout=60)
    assert done.returncode == 2 and "cannot write there" in done.stderr


def test_ctrl_c_stops_every_rank_with_one_line(tmp_path):
    """Ctrl-C (SIGINT to the whole process group, as a terminal sends it) while
    the ranks start: exit 130, one line saying what was written, no traceback
    from any rank, no process left."""
    command = [sys.executable, "-m", "dsinfra", "demo", "--quick", "--out", str(tmp_path)]
    run = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        seen = run.stderr.readline()
        assert "dsinfra demo: 4 processes" in seen, seen
        time.sleep(2)  # the ranks are importing torch
        os.killpg(run.pid, signal.SIGINT)
        out, err = run.communicate(timeout=60)
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
    assert run.returncode == 130, seen + err
    assert "Traceback" not in seen + err and "KeyboardInterrupt" not in seen + err
    last = err.strip().splitlines()[-1]
    assert last.startswith("dsinfra demo: interrupted; ") and ("written in" in last or "no outputs written" in last), last
    with pytest.raises(ProcessLookupError):
        for _ in range(50):  # the ranks are killed and reaped before the demo exits; a zombie may linger a moment
            os.killpg(run.pid, 0)
            time.sleep(0.1)


SUMMARY = {
    "config": {"steps": 300},
    "training": {"first_loss": 4.324, "last_loss": 0.2, "median_step_seconds": 0.667},
    "balancing": {
        "planned_max_over_mean": {"before": [1.003, 1.0], "after": [1.0, 1.0]},
        "serving_max_over_mean_in_order": [1.19, 1.211],
        "serving_max_over_mean_balanced": [1.03, 1.004],
    },
    "serving": [
        {"rank": r, "prompts": [[1]] * 6, "sorted_correctly": 2 + 4 * r, "logits_calc_diff": 1e-5, "token_agreement": 1.0}
        for r in range(2)
    ],
    "files": {"loss_curve": "loss_curve.png", "eplb_placement": "eplb_placement.png"},
}


def test_summary_explains_itself_within_120_columns():
    text = outputs.summary_text(SUMMARY, "demo-out", 210.4)
    lines = text.splitlines()
    assert max(len(line) for line in lines) <= 120
    assert lines[0] == "training: loss 4.324 -> 0.200 (300 steps, 667 ms/step)"
    assert "  layer 1: training loads 1.000 -> 1.000 planned; serving 1.211 -> 1.004 measured" in lines
    assert any("EPLB gains little here" in line for line in lines)
    assert any("the sort is learned in part (300 steps: about two thirds sorted)" in line for line in lines)
    assert "serving rank 1: 6 requests, 6 sorted correctly" in text
    assert lines[-2:] == ["outputs in demo-out: loss_curve.png, eplb_placement.png, summary.json, summary.txt", "done in 210 s"]


def test_progress_line_shows_the_time_left(capsys):
    outputs.progress(3, 300, 1.5, [9.0, 0.5, 0.5])
    line = capsys.readouterr().err
    assert line.startswith("\r  training [") and "3/300  loss 1.500  500 ms/step  2m28s left" in line
    assert len(line) <= 80
    outputs.progress(300, 300, 0.18, [0.6] * 300)
    assert "300/300  loss 0.180  600 ms/step  0s left" in capsys.readouterr().err
