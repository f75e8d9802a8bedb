"""``python -m dsinfra <command>``: the command line.

Each command lives in its own module, which defines ``add_arguments(parser)``
and ``run(args) -> int``; :data:`COMMANDS` maps command names to those modules.
A bad argument, or a :class:`CommandError` raised by a command, ends the run
with one line on stderr and exit code 2, in the command line's own terms (the
flags the user typed, not the names of the library's arguments). Ctrl-C ends
it with one line and exit code 130. A command checks the paths it will write
before it starts its work (:func:`check_output`).
"""

from __future__ import annotations

import argparse
import importlib
import os
import re
import sys
from collections.abc import Mapping, Sequence

# name -> (module, one-line help)
COMMANDS = {
    "info": ("dsinfra.info", "versions, devices, and which implementation each operation would use"),
    "bench": ("dsinfra.bench.cli", "run the benchmarks and report them against the machine's ceilings"),
    "eplb": ("dsinfra.eplb.cli", "plan expert replication and placement from a file of expert loads"),
    "demo": ("dsinfra.demo.cli", "train and serve a small DeepSeek-V3-style model through every component"),
    "schedule": ("dsinfra.dualpipe.cli", "simulate and draw a pipeline schedule (DualPipe, DualPipeV, 1F1B, ZB1P)"),
    "run": ("dsinfra.run_aliased", "run a script written for DeepSeek's originals, their imports resolving to dsinfra"),
    "generate": ("dsinfra.models.cli", "greedy generation with a Hugging Face DeepSeek-V2/V3/R1/V3.2 checkpoint through FlashMLA, DeepGEMM, DeepEP"),
    "kernels": ("dsinfra.kernel_report", "compile the Triton kernels for sm_80/89/90 and gfx942 and report their resources"),
}


class CommandError(Exception):
    """A user error a command reports as one line and exit code 2."""


def in_flag_terms(error: Exception, flags: Mapping[str, str]) -> CommandError:
    """``error`` as a CommandError whose message says ``flags[name]`` (the flag the
    user typed) wherever it said ``name`` (the library argument behind it)."""
    message = str(error)
    for name, flag in flags.items():
        message = re.sub(rf"(?<![\w.-]){re.escape(name)}(?![\w])", flag, message)
    return CommandError(message)


def check_output(flag: str, path: str, *, picture: bool = False) -> None:
    """Raise CommandError unless a file can be written at ``path`` (given as
    ``flag``); with ``picture``, also unless matplotlib is there and writes its suffix.
    A file the check creates is removed again; an existing one is left as it was."""
    if picture:
        formats = picture_formats()
        if formats is None:
            raise CommandError(f"{flag} needs matplotlib: pip install matplotlib")
        suffix = os.path.splitext(path)[1].lower().lstrip(".")
        if suffix not in formats:
            raise CommandError(f"{flag} {path}: unknown picture format {suffix or '(no suffix)'}; use .png, .svg or .pdf")
    if os.path.isdir(path):
        raise CommandError(f"{flag} {path}: is a folder; give a file name")
    existed = os.path.exists(path)
    try:
        with open(path, "ab"):
            pass
    except OSError as error:
        raise CommandError(f"{flag} {path}: cannot write there ({error.strerror})") from None
    if not existed:
        os.remove(path)


def picture_formats() -> set[str] | None:
    """The file suffixes matplotlib can write, or None without matplotlib."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
    except ImportError:
        return None
    return set(FigureCanvasAgg.get_supported_filetypes())


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
    except KeyboardInterrupt as interrupt:
        print(f"\ndsinfra {args.command}: interrupted" + (f"; {interrupt}" if str(interrupt) else ""), file=sys.stderr)
        return 130
