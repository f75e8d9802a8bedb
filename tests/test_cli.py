import dataclasses
import json
import subprocess
import sys
import types

import pytest

from dsinfra import cli


def dsinfra(*args):
    return subprocess.run([sys.executable, "-m", "dsinfra", *args], capture_output=True, text=True, timeout=120)


def test_info():
    done = dsinfra("info")
    assert done.returncode == 0, done.stderr
    for heading in ("versions", "machine", "settings", "implementations"):
        assert heading in done.stdout


def test_info_json():
    done = dsinfra("info", "--json")
    report = json.loads(done.stdout)
    assert report["versions"]["dsinfra"]


@pytest.mark.parametrize("command", [[], ["info"], ["bench"]])
def test_help_everywhere(command, capsys):
    with pytest.raises(SystemExit) as exit:
        cli.main([*command, "--help"])
    assert exit.value.code == 0
    assert "usage: dsinfra" in capsys.readouterr().out


@pytest.mark.parametrize(
    "args, message",
    [
        (["nonsense"], "invalid choice: 'nonsense'"),
        (["info", "--bad"], "unrecognized arguments: --bad"),
        (["bench", "--repeats", "many"], "argument --repeats: invalid int value: 'many'"),
        (["bench", "no_such_component"], "unknown benchmark no_such_component"),
        (["bench", "--device", "tpu"], "--device must be cpu or cuda[:N]"),
        (["bench", "--repeats", "0"], "--repeats >= 1"),
    ],
)
def test_bad_arguments_give_one_line_and_exit_2(args, message, capsys):
    assert _exit_code(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err


def test_bench_on_a_missing_gpu(capsys, monkeypatch):
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    assert _exit_code(["bench", "--device", "cuda"]) == 2
    assert "no CUDA device" in capsys.readouterr().err


def test_bench_lists_and_writes_json(tmp_path, capsys, monkeypatch):
    fake = types.ModuleType("fake")
    fake.__doc__ = "A fake benchmark."
    fake.benchmark = lambda ctx: ctx.measure("noop", lambda: None, flops=1.0)
    monkeypatch.setattr("dsinfra.bench.runner.registered", lambda: {"fake": fake})
    path = tmp_path / "bench.json"
    assert _exit_code(["bench", "--quick", "--repeats", "1", "--json", str(path)]) == 0
    out = capsys.readouterr().out
    assert "registered benchmarks" not in out and "ceilings:" in out  # the list is --list's
    report = json.loads(path.read_text())
    assert report["quick"] is True and report["ceilings"]["copy_bytes_per_s"] > 0
    assert [r["case"] for r in report["results"]] == ["noop"]


def test_bench_list_shows_the_registered_benchmarks():
    done = dsinfra("bench", "--list")
    assert done.returncode == 0 and "registered benchmarks:" in done.stdout and "  fp8 " in done.stdout
    assert "ceilings" not in done.stdout  # listing runs nothing


@pytest.mark.parametrize("name", ["missing/x.json", "."])
def test_bench_checks_its_json_path_before_running(name, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("dsinfra.bench.runner.run_benchmarks", lambda *a, **k: pytest.fail("ran before checking --json"))
    assert _exit_code(["bench", "--json", name]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"--json {name}: " in err and "registered benchmarks" not in err
    assert list(tmp_path.iterdir()) == []


def _exit_code(args):
    try:
        return cli.main(args)
    except SystemExit as exit:
        return exit.code


def test_bench_report_prints_a_saved_report_in_markdown(tmp_path, capsys):
    from dsinfra.bench import Result, runner

    result = Result("fake", "a case", time_s=0.002, min_time_s=0.0015, baseline="naive", baseline_time_s=0.006)
    result.derive(None)
    report = {
        "date": "2026-11-29", "device": "cpu", "machine": {"cpu": "a CPU"}, "versions": {"torch": "2.x"},
        "ceilings": {"copy_bytes_per_s": 2e10, "matmul_flops_per_s": 1e12}, "results": [dataclasses.asdict(result)],
    }
    path = tmp_path / "report.json"
    runner.write_json(report, str(path))
    assert _exit_code(["bench", "--report", str(path), "--markdown"]) == 0
    out = capsys.readouterr().out
    assert "| case | median ms | min ms | baseline | baseline ms | speed-up |" in out
    assert "| a case | 2 | 1.5 | naive | 6 | 3.00x |" in out
    for text, reason in [
        ("{}", 'no "date"'),
        ('{"results": []}', 'no "date"'),
        ("[1, 2]", "a JSON list, not an object"),
        ("{\n  oops", "line 2, column 3: Expecting property name"),
        (json.dumps({**report, "results": [{"case": "x"}]}), "results[0] is not a benchmark result"),
        (json.dumps({**report, "ceilings": {}}), 'no "ceilings"."copy_bytes_per_s"'),
    ]:
        path.write_text(text)
        assert _exit_code(["bench", "--report", str(path)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"not a report written by bench --json ({reason}" in err, err
