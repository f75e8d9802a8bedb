"""The quick runs of the kernel benchmarks: every case is measured and carries its comparisons."""

from dsinfra.bench import BenchContext, runner


def quick_run(name):
    ctx = BenchContext(name, "cpu", ceilings=None, quick=True, warmup=0, repeats=1, log=lambda _: None)
    runner.registered()[name].benchmark(ctx)
    return ctx.results


def test_flash_mla_compares_with_the_reference_and_torch_sdpa():
    results = quick_run("flash_mla")
    assert len(results) == 2
    for result in results:
        assert result.baseline == "reference" and result.speedup > 0 and result.flops > 0
    dense, fp8 = results
    assert dense.extra["sdpa_ms"] > 0 and dense.extra["vs_torch_sdpa"] > 0
    assert "sdpa_ms" not in fp8.extra  # FP8 and sparse cases have no fused counterpart


def test_fp8_casts_against_the_one_pass_formulas():
    results = quick_run("fp8")
    assert [r.case.split()[0] for r in results] == [
        "per_token_cast_to_fp8", "per_token_cast_back", "per_block_cast_to_fp8", "per_block_cast_back",
    ]
    for result in results:
        assert result.baseline == "one pass" and result.speedup > 0 and result.bytes > 0


def test_models_generate_the_same_tokens_as_transformers():
    results = quick_run("models")
    assert [r.case for r in results] == [
        "deepseek_v2 batch 1", "deepseek_v2 batch 8", "deepseek_v3 batch 1", "deepseek_v3 batch 8",
        "deepseek_v32 batch 1", "deepseek_v32 batch 8", "deepseek_v3 batch 8, 16 heads of DeepSeek's MLA widths",
    ]
    for result in results:
        assert result.baseline == "transformers generate" and result.speedup > 0
        batch = result.params["batch"]
        assert result.extra["identical"] == f"{batch}/{batch}", result.case
