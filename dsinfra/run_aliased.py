"""Run a Python script written for DeepSeek's originals on dsinfra, unchanged:
``import flash_mla`` (``deep_gemm``, ``deep_ep``, ``dualpipe``, ``eplb``)
resolves to dsinfra's module (see :mod:`dsinfra.alias`).

    python -m dsinfra run script.py [args ...]
    python -m dsinfra run -m module [args ...]
    python -m dsinfra run --override script.py   # shadow installed packages of those names too

The script runs as ``python script.py`` would run it (``__name__ ==
"__main__"``, ``sys.argv``, its directory first on ``sys.path``), and so do
the Python processes it starts (``torch.multiprocessing.spawn`` workers,
subprocesses): they find the aliases through the ``sitecustomize`` module of
``dsinfra/alias_site``, put first on their ``PYTHONPATH``, which then runs any
``sitecustomize`` it hides. Nothing is written to disk, so a killed run leaves
nothing behind.
"""

from __future__ import annotations

import argparse
import importlib.machinery
import importlib.util
import os
import runpy
import sys

import dsinfra

# The directory of the sitecustomize module every process started under ``run`` imports first.
ALIAS_SITE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "alias_site")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--override", action="store_true", help="shadow installed packages of the same names too")
    parser.add_argument("-m", dest="as_module", action="store_true", help="run a module (as python -m does), not a script")
    parser.add_argument("target", metavar="script.py | module", help="the script to run (or, with -m, the module)")
    parser.add_argument("args", nargs=argparse.REMAINDER, help="its arguments")


def run(args: argparse.Namespace) -> int:
    dsinfra_root = os.path.dirname(os.path.dirname(os.path.abspath(dsinfra.__file__)))
    paths = [ALIAS_SITE, *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep)), dsinfra_root]
    os.environ["PYTHONPATH"] = os.pathsep.join(paths)
    if args.override:
        os.environ["DSINFRA_ALIAS_OVERRIDE"] = "1"
    from dsinfra import alias

    alias.install()
    sys.argv = [args.target, *args.args]
    if args.as_module:
        sys.path[0] = os.getcwd()
        runpy.run_module(args.target, run_name="__main__", alter_sys=True)
    else:
        sys.path[0] = os.path.dirname(os.path.abspath(args.target))
        runpy.run_path(args.target, run_name="__main__")
    return 0


def run_hidden_sitecustomize(path: str) -> None:
    """Run the ``sitecustomize`` module that the one at ``path`` hides on ``sys.path``, if any."""
    here = os.path.dirname(os.path.abspath(path))
    rest = [p for p in sys.path if os.path.abspath(p or os.curdir) != here]
    spec = importlib.machinery.PathFinder.find_spec("sitecustomize", rest)
    if spec is not None and spec.loader is not None:
        spec.loader.exec_module(importlib.util.module_from_spec(spec))


def main() -> int:
    """``python -m dsinfra.run_aliased``: ``python -m dsinfra run`` without loading the other commands."""
    parser = argparse.ArgumentParser(
        prog="python -m dsinfra run", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_arguments(parser)
    return run(parser.parse_args())


if __name__ == "__main__":
    raise SystemExit(main())
