"""`python -m dsinfra kernels`: every Triton kernel compiles ahead of time for
sm_80, sm_89, sm_90 and gfx942, typed as the JIT types it, and passes its checks.

Compiling every case takes minutes, so the test compiles the cases each module
marks representative (its most demanding shapes), for all four targets; the
command without ``--representative`` compiles them all."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from dsinfra import cli, kernel_report
from dsinfra.aot import Binary
from dsinfra.triton_utils import TARGETS

pytest.importorskip("triton.backends.nvidia")
pytest.importorskip("triton.backends.amd")


def test_representative_cases_pass_on_every_target(tmp_path, capsys):
    out = tmp_path / "kernels.json"
    code = cli.main(["kernels", "--targets", "sm80,sm89,sm90,gfx942", "--representative", "--jobs", "2", "--json", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert code == 0, [row for row in rows if row["problems"]]
    for row in rows:
        assert set(kernel_report.ROW_FIELDS) <= set(row)
        assert row["compiled"] and row["error"] is None and row["registers"] > 0
    kernels = Counter(row["kernel"] for row in rows)
    assert {"flash_mla.split_kernel", "deep_gemm.m_grouped_gemm_kernel", "deep_ep.layout_kernel"} <= set(kernels)
    assert all(count % 4 == 0 for count in kernels.values())  # each on every target
    split = [row for row in rows if row["kernel"] == "flash_mla.split_kernel"]
    assert all("heads=" in row["config"] and "s_q=" in row["config"] for row in split)
    assert all(row["async_copy"] for row in split if row["target"] != "gfx942")
    assert all("GMMA" in row["tensor_core"] for row in rows if row["target"] == "sm90" and "gemm" in row["kernel"])


def test_every_kernel_module_declares_cases():
    modules = kernel_report.kernel_modules()
    assert {"dsinfra.flash_mla.triton_impl", "dsinfra.deep_gemm.triton_impl", "dsinfra.deep_ep.triton_impl"} <= set(modules)


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
