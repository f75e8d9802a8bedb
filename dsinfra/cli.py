"""``python -m dsinfra <command>``: the command line.

Each command lives in its own module, which defines ``add_arguments(parser)``
and ``run(args) -> int``; :data:`COMMANDS` maps command names to those modules.
A bad argument, or a :class:`CommandError` raised by a command, ends the run
with one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

# name -> (module, one-line help)
COMMANDS = {
    "info": ("dsinfra.info", "versions, devices, and which implementation each operation would use"),
    "bench": ("dsinfra.bench.cli", "run the benchmarks and report them against the machine's ceilings"),
    "eplb": ("dsinfra.eplb.cli", "plan expert replication and placement from a file of expert loads"),
    "demo": ("dsinfra.demo.cli", "train and serve a small DeepSeek-V3-style model through every component"),
    "schedule": ("dsinfra.dualpipe.cli", "simulate and draw a pipeline schedule (DualPipe, DualPipeV, 1F1B, ZB1P)"),
    "kernels": ("dsinfra.kernel_report", "compile the Triton kernels for sm_80/89/90 and gfx942 and report their resources"),
}


class CommandError(Exception):
    """A user error a command reports as one line and exit code 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one clear line, not the whole usage
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="dsinfra", description="DeepSeek's open infrastructure in portable Python.")
    parser.add_argument("--version", action="version", version=f"dsinfra {importlib.import_module('dsinfra').__version__}")
    commands = parser.add_subparsers(dest="command", metavar="command", required=True)
    for name, (module_name, summary) in COMMANDS.items():
        module = importlib.import_module(module_name)
        sub = commands.add_parser(name, help=summary, description=module.__doc__)
        sub.formatter_class = argparse.RawDescriptionHelpFormatter
        module.add_arguments(sub)
        sub.set_defaults(command_module=module)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.command_module.run(args) or 0
    except CommandError as error:
        print(f"dsinfra {args.command}: error: {error}", file=sys.stderr)
        return 2
