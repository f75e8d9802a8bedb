from dsinfra.bench import BenchContext, runner


def test_quick_benchmark_reports_every_case():
    assert "eplb" in runner.registered()
    ctx = BenchContext("eplb", "cpu", ceilings=None, quick=True, warmup=0, repeats=1, log=lambda _: None)
    runner.registered()["eplb"].benchmark(ctx)
    assert [r.params["policy"] for r in ctx.results] == ["hierarchical", "hierarchical", "global"]
    for result in ctx.results:
        assert result.baseline == "DeepSeek greedy" and result.speedup is not None
        assert result.extra["layers no worse"] == "8/8"
        assert float(result.extra["floor"]) <= float(result.extra["imbalance"]) < float(result.extra["baseline imbalance"])
