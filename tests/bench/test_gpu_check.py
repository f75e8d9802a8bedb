"""The GPU check's logic, run on the CPU: results written as they come, the
deadline respected, the script's files within bounds."""

import json
import os
import subprocess
from pathlib import Path

import pytest

from dsinfra.bench import gpu_check

ROOT = Path(__file__).resolve().parents[2]


def read_results(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "check.jsonl").read_text().splitlines()]


def test_quick_check_checks_and_times_every_case(tmp_path):
    assert gpu_check.main(["--out", str(tmp_path), "--quick", "--device", "cpu", "--seconds", "600"]) == 0
    results = read_results(tmp_path)
    assert [r["kind"] for r in results] == ["ceiling"] + ["mla"] * 2 + ["gemm"] * 4
    ceiling = results[0]
    assert ceiling["read_bytes_per_s"] > 0 and ceiling["fp8_matmul_flops_per_s"] is None  # no FP8 matmul ceiling on a CPU
    for result in results[1:]:
        assert result["ok"] and result["calc_diff"] < 1e-4 and result["ms"] > 0 and result["of_read"] > 0
    assert results[1]["of_matmul"] > 0  # MLA against the bf16 matmul rate
    assert results[3]["versus"] == "bf16 matmul" and results[3]["speedup"] > 0
    summary = (tmp_path / "summary.md").read_text()
    assert summary.count("| mla |") == 2 and summary.count("| gemm |") == 4


def test_cases_past_the_deadline_are_skipped(tmp_path):
    gpu_check.main(["--out", str(tmp_path), "--quick", "--device", "cpu", "--seconds", "0"])
    results = read_results(tmp_path)
    assert results[0]["kind"] == "ceiling" and results[0]["ok"]
    assert all(r["error"].startswith("skipped") for r in results[1:]) and len(results) == 7


def test_a_failing_case_is_recorded_and_the_rest_run(tmp_path):
    check = gpu_check.Check(tmp_path, __import__("torch").device("cpu"), 60, quick=True, log=lambda _: None)
    check.run("gemm", "broken", lambda: 1 / 0)
    check.run("gemm", "fine", lambda: {"ok": True, "ms": 1.0})
    broken, fine = read_results(tmp_path)
    assert broken["ok"] is False and "ZeroDivisionError" in broken["error"] and fine["ok"]


@pytest.mark.skipif(not Path("/usr/bin/timeout").exists() and not Path("/bin/timeout").exists(), reason="needs timeout(1)")
def test_script_writes_at_most_six_files(tmp_path):
    environment = {**os.environ, "GPU_CHECK_QUICK": "1", "GPU_CHECK_SECONDS": "10", "PYTHONPATH": str(ROOT)}
    done = subprocess.run(["bash", "scripts/gpu-check.sh", str(tmp_path)], cwd=ROOT, env=environment,
                          capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr
    files = sorted(path.name for path in tmp_path.iterdir())
    assert len(files) <= 6 and {"environment.txt", "check.jsonl", "check.log", "tests.txt"} <= set(files)
    assert "dsinfra" in (tmp_path / "environment.txt").read_text()
    assert all(result["kind"] in ("ceiling", "mla", "gemm") for result in read_results(tmp_path))
