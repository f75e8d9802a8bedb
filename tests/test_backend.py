import subprocess
import sys

import pytest
import torch

from dsinfra import backend


def test_auto_on_cpu_picks_torch(monkeypatch):
    monkeypatch.delenv("DSINFRA_BACKEND", raising=False)
    assert backend.choose("op", torch.device("cpu")) == "torch"
    monkeypatch.setenv("DSINFRA_BACKEND", "auto")
    assert backend.choose("op", "cpu") == "torch"


@pytest.mark.gpu
def test_auto_on_gpu_picks_triton(monkeypatch):
    monkeypatch.delenv("DSINFRA_BACKEND", raising=False)
    assert backend.choose("op", torch.device("cuda")) == "triton"


@pytest.mark.parametrize("value", ["reference", "torch", "TORCH", " reference "])
def test_variable_overrides(monkeypatch, value):
    monkeypatch.setenv("DSINFRA_BACKEND", value)
    assert backend.choose("op", "cpu") == value.strip().lower()


def test_triton_on_cpu_runs_under_the_interpreter(monkeypatch):
    monkeypatch.setenv("DSINFRA_BACKEND", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert backend.choose("op", "cpu") == "triton"


def test_triton_on_cpu_without_the_interpreter_raises(monkeypatch):
    monkeypatch.setenv("DSINFRA_BACKEND", "triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        backend.choose("flash_mla_with_kvcache", "cpu")


def test_unknown_value_names_the_allowed_ones(monkeypatch):
    monkeypatch.setenv("DSINFRA_BACKEND", "cuda")
    with pytest.raises(ValueError, match="auto, reference, torch, triton") as error:
        backend.choose("op", "cpu")
    assert "'cuda'" in str(error.value)


def test_load_finds_the_implementation_module():
    with pytest.raises(ModuleNotFoundError, match="dsinfra.testing.torch_impl"):
        backend.load("dsinfra.testing", "torch")
    with pytest.raises(ValueError, match="implementation must be one of"):
        backend.load("dsinfra.testing", "auto")


def test_range_checks(monkeypatch):
    monkeypatch.delenv("DSINFRA_CHECKS", raising=False)
    assert backend.range_checks_enabled("cpu")
    assert not backend.range_checks_enabled("cuda")
    monkeypatch.setenv("DSINFRA_CHECKS", "1")
    assert backend.range_checks_enabled("cuda")


def test_parallel_units_on_cpu_are_threads():
    assert backend.num_parallel_units("cpu") == torch.get_num_threads()


def test_import_is_cheap():
    code = "import sys, dsinfra; print(sorted(m for m in sys.modules if m.startswith(('dsinfra', 'torch', 'triton'))))"
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert loaded.strip() == "['dsinfra']"


def test_subpackages_load_lazily():
    import dsinfra

    assert "testing" in dsinfra.subpackages()
    assert dsinfra.testing.calc_diff is not None
    with pytest.raises(AttributeError):
        dsinfra.no_such_component
