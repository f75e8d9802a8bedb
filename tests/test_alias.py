"""dsinfra.alias and ``python -m dsinfra run``: DeepSeek's import names give
dsinfra's modules, submodules included, in the script and in the processes it
starts; a real package of the same name wins unless asked otherwise."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
import textwrap

import pytest

import dsinfra
from dsinfra import cli


@pytest.fixture
def alias():
    from dsinfra import alias

    alias.install(override=False)
    yield alias
    alias.uninstall()
    for name in list(sys.modules):  # real packages of those names that the tests imported
        if name.partition(".")[0] in alias.ALIASES:
            del sys.modules[name]


def test_names_are_dsinfras_modules(alias):
    import deep_ep
    import deep_ep.utils.envs
    import deep_gemm.utils
    import dualpipe.comm
    import eplb
    import flash_mla
    from dualpipe import DualPipe, set_p2p_tensor_shapes

    import dsinfra.deep_ep.utils.envs
    import dsinfra.deep_gemm.utils
    import dsinfra.dualpipe

    assert flash_mla is dsinfra.flash_mla and deep_ep is dsinfra.deep_ep and eplb is dsinfra.eplb
    assert deep_gemm.utils is dsinfra.deep_gemm.utils and deep_gemm.utils.ceil_div(5, 2) == 3
    assert deep_ep.utils.envs is dsinfra.deep_ep.utils.envs  # DeepEP's tests import their helpers from the package
    assert DualPipe is dsinfra.dualpipe.DualPipe and dualpipe.comm is sys.modules["dualpipe.comm"] is dsinfra.dualpipe.comm
    assert set_p2p_tensor_shapes is dsinfra.dualpipe.set_p2p_tensor_shapes
    # dsinfra's modules keep their own names and specs
    assert flash_mla.__name__ == "dsinfra.flash_mla" and flash_mla.__spec__.name == "dsinfra.flash_mla"
    assert importlib.reload(eplb) is dsinfra.eplb
    with pytest.raises(ModuleNotFoundError, match="deep_gemm.no_such_module"):
        importlib.import_module("deep_gemm.no_such_module")


def fake_package(root, name):
    os.makedirs(root / name)
    (root / name / "__init__.py").write_text("REAL = True\n")


def test_a_real_package_wins_unless_overridden(alias, tmp_path, monkeypatch):
    fake_package(tmp_path, "eplb")
    monkeypatch.syspath_prepend(str(tmp_path))
    import eplb

    assert eplb.REAL
    del sys.modules["eplb"]
    alias.install(override=True)
    import eplb

    assert eplb is dsinfra.eplb
    del sys.modules["eplb"]
    monkeypatch.setenv("DSINFRA_ALIAS_OVERRIDE", "0")
    alias.install()
    assert importlib.import_module("eplb").REAL
    assert alias.installed() is sys.meta_path[0]
    alias.uninstall()
    assert alias.installed() is None


SCRIPT = """\
import importlib.util
import multiprocessing
import sys

import sitecustomize_marker  # put there by the sitecustomize that the alias's one hides


def child(queue):
    queue.put((importlib.util.find_spec("flash_mla").name, sitecustomize_marker.SEEN, sys.modules["dsinfra.alias"].installed().override))


if __name__ == "__main__":
    import dualpipe
    import eplb

    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=child, args=(queue,))
    process.start()
    print(dualpipe.__name__, eplb.__name__, sys.argv[1:], queue.get(timeout=60))
    process.join()
    sys.exit(process.exitcode + 3)
"""


def test_run_a_script_and_its_processes(tmp_path):
    (tmp_path / "script.py").write_text(SCRIPT)
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text("import sys, types\nsys.modules['sitecustomize_marker'] = types.SimpleNamespace(SEEN=True)\n")
    fake_package(tmp_path, "dualpipe")  # beside the script: the real one would win without --override
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), os.path.dirname(os.path.dirname(dsinfra.__file__))])}
    command = [sys.executable, "-m", "dsinfra", "run", "--override", str(tmp_path / "script.py"), "--flag", "x"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 3, done.stderr
    assert done.stdout.strip() == "dsinfra.dualpipe dsinfra.eplb ['--flag', 'x'] ('flash_mla', True, True)"


def test_run_a_module(tmp_path, monkeypatch, capsys):
    (tmp_path / "as_module.py").write_text(textwrap.dedent("""\
        import sys
        import dualpipe
        import eplb
        print(__name__, dualpipe.__name__, eplb.__name__, sys.argv[1:])
    """))
    fake_package(tmp_path, "dualpipe")  # in the working directory: the real one wins
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.setattr(sys, "argv", list(sys.argv))
    monkeypatch.setenv("PYTHONPATH", "")
    monkeypatch.delenv("DSINFRA_ALIAS_OVERRIDE", raising=False)
    try:
        assert cli.main(["run", "-m", "as_module", "-q"]) == 0
        # The processes it starts import the sitecustomize shipped in the package: nothing
        # written to disk, so nothing left behind by a run that is killed.
        site = os.environ["PYTHONPATH"].split(os.pathsep)[0]
        assert site == os.path.join(os.path.dirname(dsinfra.__file__), "alias_site")
        assert os.path.isfile(os.path.join(site, "sitecustomize.py"))
    finally:
        from dsinfra import alias

        alias.uninstall()
        sys.modules.pop("dualpipe", None)
    assert capsys.readouterr().out == "__main__ dualpipe dsinfra.eplb ['-q']\n"
