"""`python -m dsinfra kernels`: every Triton kernel compiles ahead of time for
sm_80, sm_89, sm_90 and gfx942, typed as the JIT types it, and passes its checks.

The full report compiles some 200 kernels (tens of minutes on 2 cores), so the
test compiles the representative case of the most demanding kernel, FlashMLA's
split kernel (128 heads, two queries, FP8 cache), for all four targets, and the
GEMM's on sm_90; ``python -m dsinfra kernels`` compiles everything."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter

import pytest

from dsinfra import cli, kernel_report
from dsinfra.aot import Binary
from dsinfra.triton_utils import TARGETS

pytest.importorskip("triton.backends.nvidia")
pytest.importorskip("triton.backends.amd")


def run_report(tmp_path, *arguments) -> list[dict]:
    out = tmp_path / "kernels.json"
    code = cli.main(["kernels", "--representative", "--jobs", "2", "--json", str(out), *arguments])
    rows = json.loads(out.read_text())["rows"]
    assert code == 0
    for row in rows:
        assert set(kernel_report.ROW_FIELDS) <= set(row)
        assert row["compiled"] and row["error"] is None and row["registers"] > 0, row
        assert not row["problems"], row
    return rows


def test_mla_split_kernel_on_every_target(tmp_path):
    rows = run_report(tmp_path, "--kernels", "flash_mla.split")
    assert sorted(row["target"] for row in rows) == sorted(TARGETS)
    for row in rows:
        assert "heads=128" in row["config"] and "s_q=2" in row["config"] and "cache=fp8" in row["config"]
        assert row["async_copy"] == (row["target"] != "gfx942")
        assert row["shared_bytes"] <= TARGETS[row["target"]].shared_bytes
    families = {row["target"]: row["tensor_core"] for row in rows}
    assert families == {"sm80": "HMMA", "sm89": "HMMA", "sm90": "HGMMA", "gfx942": "MFMA.bf16"}


def test_gemm_uses_wgmma_on_sm90(tmp_path):
    rows = run_report(tmp_path, "--kernels", "deep_gemm.m_grouped", "--targets", "sm90")
    assert [row["tensor_core"] for row in rows] == ["QGMMA"] and rows[0]["async_copy"]


def test_indexer_and_sparse_prefill_on_sm90(tmp_path):
    rows = run_report(tmp_path, "--kernels", "mqa_logits|sparse_prefill", "--targets", "sm90")
    assert {row["kernel"].rsplit(".", 1)[1] for row in rows} == {"mqa_logits_kernel", "paged_mqa_logits_kernel", "sparse_prefill_kernel"}
    assert all(row["spill_bytes"] == 0 and "MMA" in row["tensor_core"] for row in rows), rows


PLAN = """
import json
from dsinfra import kernel_report
jobs, missing = kernel_report._plan(["sm90"], None, True)
print(json.dumps({"kernels": sorted({job["kernel"] for job in jobs}), "missing": missing}))
"""


def test_every_kernel_is_launched_by_a_case():
    """Planned in a fresh process: kernels decorated under TRITON_INTERPRET cannot be typed."""
    modules = kernel_report.kernel_modules()
    assert {"dsinfra.flash_mla.triton_impl", "dsinfra.deep_gemm.triton_impl", "dsinfra.deep_ep.triton_impl"} <= set(modules)
    environment = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", PLAN], env=environment, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-2000:]
    plan = json.loads(done.stdout.splitlines()[-1])
    assert plan["missing"] == []
    assert {"flash_mla.split_kernel", "flash_mla.combine_kernel", "deep_gemm.m_grouped_gemm_kernel",
            "deep_gemm.split_k_sum_kernel", "deep_gemm.k_grouped_gemm_kernel", "deep_ep.layout_kernel"} <= set(plan["kernels"])


def _binary(**fields):
    values = dict(registers=128, spill_bytes=0, shared_bytes=1024, tensor_core="HGMMA", async_copy=True, instructions=Counter())
    return Binary(**{**values, **fields})


def test_problems_name_what_fails():
    sm90, gfx942 = TARGETS["sm90"], TARGETS["gfx942"]
    assert kernel_report.problems(_binary(), sm90, async_copy=True, wgmma=True) == []
    found = kernel_report.problems(_binary(spill_bytes=16, shared_bytes=300 * 1024, tensor_core="HMMA", async_copy=False),
                                   sm90, async_copy=True, wgmma=True)
    assert found == ["spills 16 B", f"shared {300 * 1024} B > {227 * 1024} B", "no async copy", "no wgmma"]
    # AMD: scratch is not a failure, nor the absence of async copies or wgmma
    assert kernel_report.problems(_binary(spill_bytes=16, tensor_core="MFMA.bf16", async_copy=False), gfx942,
                                  async_copy=True, wgmma=True) == []


def test_shapes_that_share_a_kernel_are_merged():
    configs = [{"heads": 128, "s_q": 1, "": "dense", "batch": 1}, {"heads": 128, "s_q": 1, "": "dense", "batch": 8}]
    assert kernel_report._config_text(configs) == "heads=128 s_q=1 dense batch=1,8"


def test_bad_targets(capsys):
    assert cli.main(["kernels", "--targets", "sm70"]) == 2
    assert "--targets must name some of sm80, sm89, sm90, gfx942" in capsys.readouterr().err
