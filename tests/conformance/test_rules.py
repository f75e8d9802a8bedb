"""The conformance runner's rule engine and stand-ins, on small synthetic sources."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from dsinfra.conformance import standins
from dsinfra.conformance.rules import (
    RULES,
    Environment,
    Patch,
    Replace,
    RuleError,
    adapt_source,
    environment,
    insert_prelude,
    prelude,
)

SOURCE = '''\
"""A test."""
from __future__ import annotations
import torch.distributed as dist

def main(rank):
    dist.init_process_group(backend='nccl', rank=rank)
    torch.set_default_device(f"cuda:{rank}")
    x = torch.ones(4, device='cuda').cuda()
    torch.cuda.synchronize()
    assert x.sum() == 4, "on 'the' device"
    torch.set_num_threads(32)
    for b in [128]:
        pass
'''


def test_the_projects_rules_adapt_devices_and_backends_but_no_assertion():
    adapted, applied = adapt_source(SOURCE, "Repo@abc:tests/test_x.py", RULES)
    assert applied == ["cuda-device-strings", "nccl-to-gloo", "machine-threads"]
    assert "backend='gloo'" in adapted and "torch.set_default_device('cpu')" in adapted
    assert "torch.ones(4, device='cpu').cuda()" in adapted  # the method call is a Patch rule's, not a Replace's
    assert "torch.cuda.synchronize()" in adapted
    assert "assert x.sum() == 4, \"on 'the' device\"" in adapted
    assert "torch.set_num_threads(torch.get_num_threads())" in adapted


def test_a_rule_that_would_change_an_assertion_is_refused():
    rule = Replace("sizes", "why", ("*",), pattern=r"== 4", replacement="== 1")
    with pytest.raises(RuleError, match="rule sizes would change an assertion: R@c:t.py, line 10"):
        adapt_source(SOURCE, "R@c:t.py", [rule])
    with pytest.raises(RuleError, match="rule cuda-device-strings would change an assertion: R@c:t.py, line 3"):
        adapt_source("x = 1\nassert (\n    str(x) != 'cuda')\n", "R@c:t.py", RULES)


def test_rules_apply_to_the_files_they_name_and_required_ones_must_match():
    rule = Replace("batch", "why", ("R@c:tests/test_*.py",), pattern=r"\[128\]", replacement="[16]", required=True)
    assert adapt_source(SOURCE, "R@c:tests/test_x.py", [rule]) == (SOURCE.replace("[128]", "[16]"), ["batch"])
    assert adapt_source(SOURCE, "R@c:tests/utils.py", [rule]) == (SOURCE, [])
    assert adapt_source(SOURCE, "R@other:tests/test_x.py", [rule]) == (SOURCE, [])
    with pytest.raises(RuleError, match="rule batch no longer matches R@c:tests/test_y.py"):
        adapt_source("print()\n", "R@c:tests/test_y.py", [rule])


def test_prelude_goes_after_the_docstring_and_future_imports():
    rules = [Patch("p", "why", ("R@*",), stand_ins=(("torch.cuda.synchronize", "no_op"),))]
    code, names = prelude("R@c:t.py", rules)
    assert names == ["p"] and "patch({'torch.cuda.synchronize': 'no_op'})" in code
    lines = insert_prelude(SOURCE, code).splitlines()
    assert lines[:2] == SOURCE.splitlines()[:2] and lines[2].startswith("import dsinfra.conformance.standins")
    assert insert_prelude("import os\n", "X = 1\n") == "X = 1\nimport os\n"
    assert prelude("Other@c:t.py", rules) == ("", [])


def test_environment_rules():
    rules = [Environment("e", "why", ("EPLB@*:README.md",), variables=(("A", "1"),)), *RULES]
    assert environment("EPLB@x:README.md", rules) == ({"A": "1", "DSINFRA_EPLB_PLAN": "deepseek"}, ["e", "eplb-deepseek-plan"])
    assert environment("DeepEP@x:tests/t.py", rules) == ({}, [])


def test_every_rule_names_its_reason_and_its_stand_ins_exist():
    assert len({rule.name for rule in RULES}) == len(RULES)
    for rule in RULES:
        assert rule.why and rule.files
        if isinstance(rule, Patch):
            assert all(callable(getattr(standins, name)) for _, name in rule.stand_ins)


def test_patch_replaces_names_and_skips_missing_modules(monkeypatch):
    helper = types.ModuleType("fake_helpers")
    helper.inner = types.SimpleNamespace(bench=None)
    monkeypatch.setitem(sys.modules, "fake_helpers", helper)
    standins.patch({
        "fake_helpers.inner.bench": "bench", "fake_helpers.sync": "no_op", "fake_helpers.seed": "no_op",
        "fake_helpers.Event": "WallClockEvent", "no_such_module.timer": "do_bench", "fake_helpers.kineto": "bench_kineto",
    })
    assert helper.kineto(lambda: None, "dispatch") >= 0  # keyword-only defaults kept by the copy
    assert helper.inner.bench.__code__ is standins.bench.__code__ and helper.inner.bench(lambda: None)[0] >= 0
    assert helper.sync.__code__ is helper.seed.__code__ is standins.no_op.__code__
    assert helper.sync is not helper.seed  # one function object per patched name (torch's compiler insists)
    assert helper.Event is standins.WallClockEvent


def test_timers_keep_the_shapes_of_what_they_replace():
    calls = []
    run = lambda: calls.append(1)  # noqa: E731
    assert isinstance(standins.do_bench(run), float)
    assert len(standins.bench(run, 20, 30, post_fn=run)) == 3
    assert isinstance(standins.bench_kineto(run, "gemm"), float) and len(standins.bench_kineto(run, ("a", "b"))) == 2
    dispatch_t, combine_t = standins.bench_kineto(run, ("dispatch", "combine"), barrier_comm_profiling=True, num_kernels_per_period=2)
    assert len(dispatch_t) == len(combine_t) == 2  # DeepEP reads the send and receive halves
    profile = standins.kernelkit_bench_kineto(run, 10)
    assert profile.get_kernel_time("k") == profile.get_e2e_time("a", "b") and len(profile.get_kernel_times(["a", "b"])) == 2
    for kernel in ("flash_fwd_splitkv_mla_fp8_sparse_kernel", "flash_fwd_mla_combine_kernel"):  # as FlashMLA looks one up
        assert [kernel in name for name in profile.get_kernel_names()] == [True]
    assert isinstance(standins.bench_by_events(run, 1, 1), float) and len(standins.bench_by_events([run, run], 1, 1)) == 2
    start, end = standins.WallClockEvent(), standins.WallClockEvent()
    start.record()
    end.record()
    assert start.elapsed_time(end) >= 0
    assert len(calls) == 10  # each timer ran each function once (and bench its post_fn)
    assert standins.hopper_capability() == (9, 0)


def test_device_count(monkeypatch):
    monkeypatch.setenv("DSINFRA_CONFORMANCE_DEVICES", "4")
    assert standins.device_count() == 4
    monkeypatch.delenv("DSINFRA_CONFORMANCE_DEVICES")
    assert standins.device_count() == 8


def test_all_gather_into_a_stacked_output_on_gloo():
    if dist.is_initialized():
        pytest.skip("a process group is already initialised here")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        stacked = torch.zeros(1, 2, 3, dtype=torch.float32)
        standins.all_gather_into_tensor(stacked, torch.ones(2, 3, dtype=torch.float32))
        assert bool((stacked == 1).all())
    finally:
        dist.destroy_process_group()


def test_the_compatibility_page_lists_every_rule():
    page = (Path(__file__).resolve().parents[2] / "docs" / "compatibility.md").read_text()
    assert [rule.name for rule in RULES if f"| {rule.name} |" not in page] == []


GROUPED_HEADS_SOURCE = '''\
import torch

def attend(query, kv, dv):
    h_q, s_q, h_kv, s_k = query.size(0), query.size(1), kv.size(0), kv.size(1)
    if h_kv != 1:
        kv = kv.repeat_interleave(h_q // h_kv, dim=0)
    kv[kv != kv] = 0.0
    attn_weight = query @ kv.transpose(-2, -1)
    attn_weight = torch.softmax(attn_weight, dim=-1)
    output = attn_weight @ kv[..., :dv]
    return attn_weight, output
'''


@pytest.mark.parametrize("h_q, h_kv, s_q, s_k", [(6, 3, 2, 5), (8, 1, 1, 7), (4, 2, 3, 0), (3, 3, 1, 1)])
def test_the_grouped_heads_reference_computes_what_the_copying_one_does(h_q, h_kv, s_q, s_k):
    file = "FlashMLA@9241ae3:tests/test_flash_mla_dense_decoding.py"
    rule = next(rule for rule in RULES if rule.name == "flash-mla-dense-reference-grouped-heads")
    adapted, applied = adapt_source(GROUPED_HEADS_SOURCE, file, [rule])
    assert applied == [rule.name] and "repeat_interleave" not in adapted
    copying, grouped = {}, {}
    exec(GROUPED_HEADS_SOURCE, copying)
    exec(adapted, grouped)
    query, kv = torch.randn(h_q, s_q, 16), torch.randn(h_kv, s_k, 16)
    kv[..., -1] = float("nan")  # a column the reference zeroes, in both forms
    for expected, actual in zip(copying["attend"](query, kv.clone(), 12), grouped["attend"](query, kv.clone(), 12)):
        assert actual.shape == expected.shape
        torch.testing.assert_close(actual, expected, rtol=1e-6, atol=1e-6)
