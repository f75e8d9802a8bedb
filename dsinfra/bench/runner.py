"""Finds the component benchmarks, runs them, prints the tables, writes the JSON."""

from __future__ import annotations

import dataclasses
import datetime
import importlib
import json
import pkgutil
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import Any

import torch

from dsinfra import environment
from dsinfra.bench import harness

def registered() -> dict[str, ModuleType]:
    """Component benchmarks by name: every module of ``dsinfra.bench`` that defines ``benchmark(ctx)``."""
    package = importlib.import_module("dsinfra.bench")
    found = {}
    for info in pkgutil.iter_modules(package.__path__):
        module = importlib.import_module(f"dsinfra.bench.{info.name}")
        if callable(getattr(module, "benchmark", None)):
            found[info.name] = module
    return dict(sorted(found.items()))


def description(module: ModuleType) -> str:
    return (module.__doc__ or "").strip().splitlines()[0] if module.__doc__ else ""


def run_benchmarks(
    names: Sequence[str],
    device: torch.device | str,
    *,
    quick: bool = False,
    warmup: int = 2,
    repeats: int = 10,
    log: Callable[[str], None] = print,
    markdown: bool = False,
) -> dict[str, Any]:
    """Measure the ceilings of ``device``, run the named benchmarks and return the report."""
    device = torch.device(device)
    modules = registered()
    unknown = [name for name in names if name not in modules]
    if unknown:
        raise ValueError(f"unknown benchmark {', '.join(unknown)}; registered: {', '.join(modules)}")
    log(f"measuring the ceilings of {device} ...")
    ceilings = harness.measure_ceilings(device, quick=quick)
    log(
        f"ceilings: copy {ceilings.copy_bytes_per_s / 1e9:.1f} GB/s, "
        f"bf16 matmul {ceilings.matmul_flops_per_s / 1e12:.3g} TFLOP/s"
    )
    results = []
    for name in names:
        log(f"\n== {name}: {description(modules[name])}")
        ctx = harness.BenchContext(name, device, ceilings=ceilings, quick=quick, warmup=warmup, repeats=repeats, log=log)
        modules[name].benchmark(ctx)
        log(format_table(ctx.results, markdown=markdown))
        results.extend(ctx.results)
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": str(device),
        "quick": quick,
        "machine": environment.machine(),
        "versions": environment.versions(),
        "settings": environment.settings(),
        "ceilings": ceilings.as_dict(),
        "results": [dataclasses.asdict(result) for result in results],
    }


def read_results(path: str) -> tuple[dict[str, Any], list[harness.Result]]:
    """A report written by :func:`write_json`, and its results as :class:`Result` objects."""
    with open(path) as f:
        report = json.load(f)
    return report, [harness.Result(**result) for result in report["results"]]


def write_json(report: dict[str, Any], path: str) -> None:
    with open(path, "w") as out:
        json.dump(report, out, indent=2, default=str)
        out.write("\n")


def _figure(value: Any) -> str:
    """Three significant figures, or the value as it is."""
    if value is None:
        return "-"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if value == 0 or 1e-3 <= abs(value) < 1e5:
        return f"{value:.3g}" if isinstance(value, float) else str(value)
    return f"{value:.2e}"


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def format_table(results: Sequence[harness.Result], *, markdown: bool = False) -> str:
    """A table of the results, one row per case, plain text or Markdown (for
    docs/performance.md); columns that no case fills are left out, and each
    ``extra`` figure gets a column of its own."""
    columns: list[tuple[str, Callable[[harness.Result], str]]] = [
        ("case", lambda r: r.case),
        ("median ms", lambda r: _figure(r.time_s * 1e3)),
        ("min ms", lambda r: _figure(r.min_time_s * 1e3)),
        ("TFLOP/s", lambda r: _figure(r.flops_per_s / 1e12) if r.flops_per_s else "-"),
        ("of matmul", lambda r: _percent(r.matmul_fraction)),
        ("GB/s", lambda r: _figure(r.bytes_per_s / 1e9) if r.bytes_per_s else "-"),
        ("of copy", lambda r: _percent(r.copy_fraction)),
        ("baseline", lambda r: r.baseline or "-"),
        ("baseline ms", lambda r: _figure(r.baseline_time_s * 1e3) if r.baseline_time_s is not None else "-"),
        ("speed-up", lambda r: f"{r.speedup:.2f}x" if r.speedup is not None else "-"),
    ]
    extras: list[str] = []
    for result in results:
        extras += [key for key in result.extra if key not in extras]
    columns += [(key, lambda r, key=key: _figure(r.extra.get(key))) for key in extras]
    rows = [[render(result) for _, render in columns] for result in results]
    keep = [i for i, (title, _) in enumerate(columns) if i == 0 or any(row[i] != "-" for row in rows)]
    table = [[columns[i][0] for i in keep]] + [[row[i] for i in keep] for row in rows]
    if markdown:
        lines = ["| " + " | ".join(line) + " |" for line in table]
        lines.insert(1, "|" + " --- |" * len(keep))
        return "\n".join(lines)
    widths = [max(len(line[i]) for line in table) for i in range(len(keep))]
    lines = ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(line, widths))) for line in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
