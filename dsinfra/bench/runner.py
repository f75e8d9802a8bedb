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
    log(describe_ceilings(ceilings.as_dict()))
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


def describe_ceilings(ceilings: dict[str, Any]) -> str:
    """One line: the copy bandwidth and the matmul rate, naming the matmul's dtype
    (reports written before the dtype was recorded measured bf16)."""
    dtype = ceilings.get("matmul_dtype", "bfloat16")
    return (f"ceilings: copy {ceilings['copy_bytes_per_s'] / 1e9:.1f} GB/s, "
            f"{'bf16' if dtype == 'bfloat16' else dtype} matmul {ceilings['matmul_flops_per_s'] / 1e12:.3g} TFLOP/s")


REPORT_FIELDS = {"date": str, "device": str, "machine": dict, "versions": dict, "ceilings": dict, "results": list}
_JSON_NAMES = {str: "string", dict: "object", list: "list"}


def read_results(path: str) -> tuple[dict[str, Any], list[harness.Result]]:
    """A report written by :func:`write_json`, and its results as :class:`Result` objects.

    Raises OSError if the file cannot be read, ValueError saying what is missing
    or wrong if it is not such a report."""
    with open(path) as f:
        try:
            report = json.load(f)
        except json.JSONDecodeError as error:
            raise ValueError(f"line {error.lineno}, column {error.colno}: {error.msg}") from None
    if not isinstance(report, dict):
        raise ValueError(f"a JSON {type(report).__name__}, not an object")
    for key, kind in REPORT_FIELDS.items():
        if not isinstance(report.get(key), kind):
            raise ValueError(f'no "{key}"' if key not in report else f'"{key}" is not a JSON {_JSON_NAMES[kind]}')
    for key, inner in (("machine", "cpu"), ("versions", "torch"), ("ceilings", "copy_bytes_per_s"), ("ceilings", "matmul_flops_per_s")):
        if inner not in report[key]:
            raise ValueError(f'no "{key}"."{inner}"')
    fields = {field.name for field in dataclasses.fields(harness.Result)}
    results = []
    for index, result in enumerate(report["results"]):
        try:
            results.append(harness.Result(**result))
        except TypeError:
            unknown = sorted(set(result) - fields) if isinstance(result, dict) else []
            raise ValueError(f"results[{index}] is not a benchmark result" + (f" (unknown {unknown[0]!r})" if unknown else "")) from None
        if not all(isinstance(value, (int, float)) for value in (results[-1].time_s, results[-1].min_time_s)):
            raise ValueError(f"results[{index}] has times that are not numbers")
    return report, results


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


TABLE_WIDTH = 120  # characters of a plain table; wider ones are split into several
BUSY_SPREAD = 1.5  # a median this many times the fastest call: the machine was busy
ABOVE_CEILING, BUSY = "!", "~"


def format_table(results: Sequence[harness.Result], *, markdown: bool = False, width: int = TABLE_WIDTH) -> str:
    """A table of the results, one row per case, plain text or Markdown (for
    docs/performance.md); columns that no case fills are left out, and each
    ``extra`` figure gets a column of its own.

    A plain table wider than ``width`` characters is split into several, each
    starting with the case (Markdown keeps one table). A fraction of a ceiling
    above 100% is marked ``!`` and a median more than 1.5x the fastest call
    ``~``, each explained under the table: figures a busy machine disturbed.
    """
    baselines = {r.baseline for r in results}
    one_baseline = len(baselines) == 1 and None not in baselines and not markdown
    columns: list[tuple[str, Callable[[harness.Result], str]]] = [
        ("case", lambda r: r.case),
        ("median ms", lambda r: _figure(r.time_s * 1e3) + (BUSY if _busy(r) else "")),
        ("min ms", lambda r: _figure(r.min_time_s * 1e3)),
        ("TFLOP/s", lambda r: _figure(r.flops_per_s / 1e12) if r.flops_per_s else "-"),
        ("of matmul", lambda r: _percent(r.matmul_fraction)),
        ("GB/s", lambda r: _figure(r.bytes_per_s / 1e9) if r.bytes_per_s else "-"),
        ("of copy", lambda r: _percent(r.copy_fraction)),
        ("baseline", lambda r: "-" if one_baseline else r.baseline or "-"),
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
        parts = ["\n".join(lines)]
    else:
        parts = [_plain(table, group) for group in _column_groups(table, width)]
    notes = _notes(results, next(iter(baselines)) if one_baseline else None)
    return "\n\n".join(parts + ["\n".join(notes)] if notes else parts)


def _busy(result: harness.Result) -> bool:
    return result.time_s > BUSY_SPREAD * result.min_time_s


def _percent(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{100 * value:.1f}%" + (ABOVE_CEILING if value > 1 else "")


def _column_groups(table: list[list[str]], width: int) -> list[list[int]]:
    """The columns of each plain table: the case, then as many of the others as fit ``width``."""
    widths = [max(len(line[i]) for line in table) for i in range(len(table[0]))]
    groups: list[list[int]] = []
    for i in range(1, len(widths)):
        if not groups or sum(widths[j] + 2 for j in groups[-1]) + widths[i] > width:
            groups.append([0])
        groups[-1].append(i)
    return groups or [[0]]


def _plain(table: list[list[str]], columns: list[int]) -> str:
    widths = [max(len(line[i]) for line in table) for i in columns]
    lines = ["  ".join(line[i].ljust(w) if i == 0 else line[i].rjust(w) for i, w in zip(columns, widths)) for line in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _notes(results: Sequence[harness.Result], baseline: str | None) -> list[str]:
    """The lines under a table: the one baseline, and what the marks mean."""
    notes = [f"baseline: {baseline}"] if baseline else []
    if any(r.matmul_fraction is not None and r.matmul_fraction > 1 or r.copy_fraction is not None and r.copy_fraction > 1 for r in results):
        notes.append(
            f"{ABOVE_CEILING} above the ceiling measured in this run: the machine was busy while the ceiling or the case "
            "was timed; rerun on a quiet machine, with more --repeats"
        )
    if any(_busy(r) for r in results):
        notes.append(
            f"{BUSY} median over {BUSY_SPREAD:g}x the fastest call: the machine was busy during this case; "
            "rerun on a quiet machine, with more --repeats"
        )
    return notes
