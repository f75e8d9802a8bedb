"""Compile every Triton kernel of dsinfra ahead of time for GPUs this machine need
not have (sm_80, sm_89, sm_90, gfx942), at the launch configurations its
wrappers pick for DeepSeek-V3's shapes, and report what each binary needs:
registers, spills, shared memory, tensor-core instructions and async copies.

A row passes when its kernel compiles, spills nothing on NVIDIA targets, fits
the target's shared memory per program, and shows what its case asks for:
async (cp.async / TMA) loads on NVIDIA targets, wgmma on sm_90. The exit code
is 1 when a row fails.

Each module that holds Triton kernels declares its cases in a function
``compile_cases(target)`` (see docs/backend.md); this command finds every
such module under dsinfra by its ``@triton.jit`` kernels.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import functools
import importlib
import json
import multiprocessing
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from dsinfra.cli import CommandError

TARGET_NAMES = ("sm80", "sm89", "sm90", "gfx942")
ROW_FIELDS = ("kernel", "config", "target", "compiled", "error", "registers", "spill_bytes", "shared_bytes",
              "tensor_core", "async_copy")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--targets", default=",".join(TARGET_NAMES),
                        help=f"comma-separated targets (default {','.join(TARGET_NAMES)})")
    parser.add_argument("--json", metavar="FILE", help="write the rows as JSON here")
    parser.add_argument("--kernels", metavar="REGEX", help="only kernels whose name matches")
    parser.add_argument("--representative", action="store_true",
                        help="only the cases each module marks representative (a quick run)")
    parser.add_argument("--jobs", type=int, default=min(8, os.cpu_count() or 1),
                        help="compiler processes (default: the CPUs, at most 8)")


def run(args: argparse.Namespace) -> int:
    from dsinfra.triton_utils import TARGETS

    targets = [name.strip() for name in args.targets.split(",") if name.strip()]
    unknown = [name for name in targets if name not in TARGETS]
    if unknown or not targets:
        raise CommandError(f"--targets must name some of {', '.join(TARGETS)}; got {args.targets!r}")
    if args.jobs < 1:
        raise CommandError(f"--jobs must be at least 1; got {args.jobs}")
    if os.environ.get("TRITON_INTERPRET") == "1":  # kernels decorated under it cannot be compiled: start afresh
        environment = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
        return subprocess.run([sys.executable, "-m", "dsinfra", "kernels", *_argv(args)], env=environment).returncode
    pattern = re.compile(args.kernels) if args.kernels else None
    start = time.monotonic()
    rows = report(targets, pattern, args.representative, args.jobs)
    print(format_table(rows))
    failed = [row for row in rows if row["problems"]]
    print(f"\n{len(rows) - len(failed)} of {len(rows)} rows pass ({time.monotonic() - start:.0f} s, Triton {_triton_version()})")
    if args.json:
        try:
            with open(args.json, "w") as out:
                json.dump({"triton": _triton_version(), "rows": rows}, out, indent=1)
                out.write("\n")
        except OSError as error:
            raise CommandError(f"--json {args.json}: {error.strerror}") from None
        print(f"wrote {args.json}")
    return 1 if failed else 0


def _argv(args: argparse.Namespace) -> list[str]:
    """The command line that gives ``args``."""
    argv = ["--targets", args.targets, "--jobs", str(args.jobs)]
    argv += ["--json", args.json] if args.json else []
    argv += ["--kernels", args.kernels] if args.kernels else []
    return argv + (["--representative"] if args.representative else [])


def _triton_version() -> str:
    import triton

    return triton.__version__


def kernel_modules() -> list[str]:
    """Every dsinfra module that defines a Triton kernel, found by its source."""
    root = Path(__file__).resolve().parent
    found = []
    for path in sorted(root.rglob("*.py")):
        if re.search(r"^@triton\.(jit|autotune)", path.read_text(), re.MULTILINE):
            parts = path.relative_to(root.parent).with_suffix("").parts
            found.append(".".join(parts))
    return found


def kernel_name(module_name: str, kernel) -> str:
    """``flash_mla.split_kernel`` for ``dsinfra.flash_mla.triton_impl._split_kernel``."""
    parts = [part for part in module_name.split(".")[1:] if part != "triton_impl"]
    return ".".join(parts + [kernel.__name__.lstrip("_")])


@functools.lru_cache(maxsize=None)
def module_cases(module_name: str, target_name: str) -> list:
    """The module's compile cases for the target (cached: workers rebuild them by index)."""
    from dsinfra.triton_utils import TARGETS

    module = importlib.import_module(module_name)
    return list(module.compile_cases(TARGETS[target_name]))


def _config_text(configs: list[dict[str, Any]]) -> str:
    """Shapes that compile to one kernel, merged: ``heads=128 s_q=1 batch=1,8,64``."""
    merged: dict[str, list] = {}
    for config in configs:
        for key, value in config.items():
            values = merged.setdefault(key, [])
            if value not in values:
                values.append(value)
    return " ".join(f"{key}={','.join(map(str, values))}" if key else ",".join(map(str, values))
                    for key, values in merged.items())


def _plan(targets: list[str], pattern, representative: bool) -> tuple[list[dict], list[dict]]:
    """Distinct compile jobs (with the shapes each serves) and rows for modules that declare nothing."""
    from dsinfra.aot import specialise
    from dsinfra.triton_utils import TARGETS

    jobs: dict[tuple, dict] = {}
    missing = []
    for module_name in kernel_modules():
        module = importlib.import_module(module_name)
        kernels = {value for value in vars(module).values() if type(value).__name__ == "JITFunction"
                   and value.__name__.endswith("_kernel") and value.fn.__module__ == module_name}
        if not callable(getattr(module, "compile_cases", None)):
            cases_by_target = {target: [] for target in targets}
        else:
            cases_by_target = {target: module_cases(module_name, target) for target in targets}
        for target in targets:
            launched = set()
            for index, case in enumerate(cases_by_target[target]):
                kernel = case.launch.kernel
                launched.add(kernel)
                name = kernel_name(module_name, kernel)
                if (pattern and not pattern.search(name)) or (representative and not case.representative):
                    continue
                key = (target, specialise(case.launch, TARGETS[target]).key())
                job = jobs.setdefault(key, dict(kernel=name, module=module_name, target=target, index=index, configs=[],
                                                async_copy=False, wgmma=False))
                job["configs"].append(case.config)
                job["async_copy"] |= case.async_copy
                job["wgmma"] |= case.wgmma
            for kernel in sorted(kernels - launched, key=lambda k: k.__name__):
                name = kernel_name(module_name, kernel)
                if not pattern or pattern.search(name):
                    missing.append(_row(name, "", target, error=f"no compile case in {module_name}.compile_cases"))
    return list(jobs.values()), missing


def _row(kernel: str, config: str, target: str, **fields) -> dict[str, Any]:
    row = dict(kernel=kernel, config=config, target=target, compiled=False, error=None, registers=None,
               spill_bytes=None, shared_bytes=None, tensor_core=None, async_copy=None)
    row.update(fields)
    row["problems"] = [] if row["compiled"] else [row["error"] or "did not compile"]
    return row


def _worker_start() -> None:
    os.environ.pop("TRITON_INTERPRET", None)
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # the JIT's default, without its warning


def compile_job(job: dict) -> dict[str, Any]:
    """Compile one job and check its binary (runs in a worker process)."""
    from dsinfra.aot import compile_specialised, inspect_binary, specialise
    from dsinfra.triton_utils import TARGETS

    target = TARGETS[job["target"]]
    config = _config_text(job["configs"])
    try:
        case = module_cases(job["module"], job["target"])[job["index"]]
        binary = inspect_binary(compile_specialised(specialise(case.launch, target), target), target)
    except Exception as error:  # a compiler error is the row's finding
        message = " ".join(str(error).split())
        return _row(job["kernel"], config, job["target"], error=f"{type(error).__name__}: {message[-300:]}")
    row = _row(job["kernel"], config, job["target"], compiled=True, registers=binary.registers,
               spill_bytes=binary.spill_bytes, shared_bytes=binary.shared_bytes,
               tensor_core=binary.tensor_core or None, async_copy=binary.async_copy)
    row["problems"] = problems(binary, target, async_copy=job["async_copy"], wgmma=job["wgmma"])
    return row


def problems(binary, target, *, async_copy: bool, wgmma: bool) -> list[str]:
    """Why a compiled kernel fails its row: spills on NVIDIA, shared memory over the
    target's limit, no async copies or no wgmma where its case asks for them."""
    found = []
    if target.backend == "cuda" and binary.spill_bytes:
        found.append(f"spills {binary.spill_bytes} B")
    if binary.shared_bytes > target.shared_bytes:
        found.append(f"shared {binary.shared_bytes} B > {target.shared_bytes} B")
    if async_copy and target.backend == "cuda" and not binary.async_copy:
        found.append("no async copy")
    if wgmma and target.wgmma and "GMMA" not in binary.tensor_core:
        found.append("no wgmma")
    return found


def report(targets: list[str], pattern=None, representative: bool = False, jobs: int = 1) -> list[dict[str, Any]]:
    """The report's rows, in the order of modules, targets and cases."""
    _worker_start()
    planned, rows = _plan(targets, pattern, representative)
    order = {target: i for i, target in enumerate(targets)}
    planned.sort(key=lambda job: (job["module"], order[job["target"]], job["index"]))
    if jobs == 1 or len(planned) <= 1:
        results = [compile_job(job) for job in planned]
    else:
        context = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=context, initializer=_worker_start) as pool:
            results = list(pool.map(compile_job, planned))
    return results + rows


def format_table(rows: list[dict[str, Any]]) -> str:
    """One line per row: the kernel, its shapes, the target and what the binary needs."""
    header = ["kernel", "config", "target", "regs", "spill", "shared KiB", "tensor core", "async", "verdict"]
    lines = [header]
    for row in rows:
        shared = row["shared_bytes"]
        lines.append([
            row["kernel"], row["config"], row["target"],
            "-" if row["registers"] is None else str(row["registers"]),
            "-" if row["spill_bytes"] is None else str(row["spill_bytes"]),
            "-" if shared is None else f"{shared / 1024:.1f}",
            row["tensor_core"] or "-",
            "-" if row["async_copy"] is None else "yes" if row["async_copy"] else "no",
            "; ".join(row["problems"]) or "ok",
        ])
    widths = [max(len(line[i]) for line in lines) for i in range(len(header) - 1)]
    text = ["  ".join(cell.ljust(width) for cell, width in zip(line, widths)) + "  " + line[-1] for line in lines]
    text.insert(1, "-" * len(text[0]))
    return "\n".join(text)
