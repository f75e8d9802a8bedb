"""``python -m dsinfra demo``: the whole path end to end (--quick), and bad input."""

import json
import os
import subprocess
import sys

import pytest


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


@pytest.mark.parametrize(
    "args, message",
    [
        (["--ranks", "4", "--pp", "1", "--ep", "2"], "--pp x --ep (1 x 2 = 2) must equal the number of ranks (4)"),
        (["--pp", "3", "--ep", "1"], "needs 6 stages"),
        (["--pp", "1", "--ep", "3"], "do not split over 3 expert-parallel ranks"),
        (["--steps", "0"], "--steps must be >= 1"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(args, message, tmp_path):
    done = demo(*args, "--out", str(tmp_path), timeout=60)
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and message in done.stderr


def test_unwritable_out(tmp_path):
    blocked = tmp_path / "file"
    blocked.write_text("")
    done = demo("--out", str(blocked / "sub"), timeout=60)
    assert done.returncode == 2 and "cannot write there" in done.stderr
