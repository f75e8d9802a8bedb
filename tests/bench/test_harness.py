import json
import types

import pytest
import torch

from dsinfra.bench import BenchContext, Ceilings, Result, format_table, measure_ceilings, runner, time_callable


def test_time_callable_counts_calls():
    calls = []
    timing = time_callable(lambda: calls.append(1), "cpu", warmup=3, repeats=7)
    assert len(calls) == 10 and len(timing.samples) == 7
    assert 0 <= timing.min <= timing.median


def test_ceilings_are_measured():
    ceilings = measure_ceilings("cpu", quick=True)
    assert ceilings.copy_bytes_per_s > 1e8
    assert ceilings.matmul_flops_per_s > 1e8
    assert ceilings.matmul_size == 512


@pytest.mark.parametrize("native", [True, False])
def test_ceiling_matmul_is_float32_on_a_cpu_without_native_bf16(monkeypatch, native):
    """A bf16 matmul without native support is a scalar loop (minutes at 2048): the
    ceiling is then the float32 rate, the dtype the CPU paths multiply in, and says so."""
    monkeypatch.setattr("dsinfra.backend.native_cpu_matmul", lambda dtype: native)
    multiplied = []
    real_matmul = torch.matmul
    monkeypatch.setattr(torch, "matmul", lambda a, b: multiplied.append(a.dtype) or real_matmul(a, b))
    ceilings = measure_ceilings("cpu", quick=True)
    expected = torch.bfloat16 if native else torch.float32
    assert set(multiplied) == {expected} and ceilings.matmul_dtype == str(expected).removeprefix("torch.")
    line = runner.describe_ceilings(ceilings.as_dict())
    assert ("bf16 matmul" if native else "float32 matmul") in line


def test_reports_without_a_matmul_dtype_measured_bf16():
    line = runner.describe_ceilings({"copy_bytes_per_s": 2e10, "matmul_flops_per_s": 1e12})
    assert line == "ceilings: copy 20.0 GB/s, bf16 matmul 1 TFLOP/s"


def test_result_ratios():
    ceilings = Ceilings(copy_bytes_per_s=100e9, matmul_flops_per_s=1e12, copy_bytes=1, matmul_size=1)
    result = Result("c", "case", time_s=0.01, min_time_s=0.008, flops=5e9, bytes=2e8, baseline="naive", baseline_time_s=0.05)
    result.derive(ceilings)
    assert result.flops_per_s == pytest.approx(5e11)
    assert result.matmul_fraction == pytest.approx(0.5)
    assert result.bytes_per_s == pytest.approx(2e10)
    assert result.copy_fraction == pytest.approx(0.2)
    assert result.speedup == pytest.approx(5.0)


def test_context_measures_against_the_baseline():
    ctx = BenchContext("demo", "cpu", ceilings=None, warmup=0, repeats=3, log=lambda _: None)
    a = torch.randn(64, 64)
    result = ctx.measure(
        "matmul", lambda: a @ a, baseline=lambda: [a @ a for _ in range(20)], baseline_repeats=2, flops=2 * 64**3, extra={"imbalance": 1.25}
    )
    assert ctx.results == [result]
    assert result.baseline == "reference" and result.speedup > 1
    assert result.matmul_fraction is None  # no ceilings given
    table = format_table(ctx.results)
    assert "matmul" in table and "imbalance" in table and "1.25" in table
    assert "GB/s" not in table  # a column no case fills is left out


def _fake_benchmark(ctx):
    x = torch.ones(1000)
    ctx.measure("sum", lambda: x.sum(), baseline=lambda: sum(x.tolist()), bytes=x.nbytes, params={"n": 1000})


def test_runner_reports_everything(monkeypatch, tmp_path):
    fake = types.ModuleType("fake")
    fake.__doc__ = "A fake benchmark.\n\nMore words."
    fake.benchmark = _fake_benchmark
    monkeypatch.setattr(runner, "registered", lambda: {"fake": fake})
    lines = []
    report = runner.run_benchmarks(["fake"], "cpu", quick=True, repeats=2, log=lines.append)
    assert "\n== fake: A fake benchmark." in lines
    assert set(report) >= {"date", "device", "machine", "versions", "ceilings", "results"}
    (result,) = report["results"]
    assert result["case"] == "sum" and result["copy_fraction"] > 0 and result["speedup"] > 0
    path = tmp_path / "report.json"
    runner.write_json(report, str(path))
    assert json.loads(path.read_text())["versions"]["torch"] == torch.__version__
    with pytest.raises(ValueError, match="unknown benchmark nope; registered: fake"):
        runner.run_benchmarks(["nope"], "cpu")


def _result(case, time_s, min_time_s, **figures):
    ceilings = Ceilings(copy_bytes_per_s=1e10, matmul_flops_per_s=1e12, copy_bytes=1, matmul_size=1)
    return Result("c", case, time_s=time_s, min_time_s=min_time_s, **figures).derive(ceilings)


def test_wide_tables_are_split_to_fit_120_columns():
    extra = {f"component figure {i}": 1.5 for i in range(8)}
    results = [_result("a long case name " * 3, 0.01, 0.009, flops=1e9, bytes=1e6, baseline="naive", baseline_time_s=0.02, extra=extra)]
    plain = format_table(results)
    assert max(len(line) for line in plain.splitlines()) <= 120
    assert all(f"component figure {i}" in plain for i in range(8))
    assert plain.count("a long case name") >= 3 * 2  # every part starts with the case
    markdown = format_table(results, markdown=True)
    assert max(len(line) for line in markdown.splitlines()) > 120  # one table, every column
    assert "baseline: naive" in plain and "| naive |" in markdown  # one baseline: said once under a plain table


def test_figures_a_busy_machine_disturbed_are_marked():
    results = [
        _result("above the ceiling", 0.001, 0.001, flops=5.895e9),
        _result("busy", 0.578, 0.004, bytes=1e6),
        _result("quiet", 0.010, 0.009, bytes=1e6),
    ]
    table = format_table(results)
    assert "589.5%!" in table and "578~" in table and "10~" not in table
    assert "! above the ceiling measured in this run" in table and "~ median over 1.5x the fastest call" in table
    assert table.count("--repeats") == 2
    assert "!" not in format_table(results[2:]) and "~" not in format_table(results[2:])
