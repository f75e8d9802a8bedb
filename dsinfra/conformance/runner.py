"""Run DeepSeek's own tests and examples against dsinfra and report.

For every case of :data:`~dsinfra.conformance.suite.CASES`: take the file
and its helpers out of the repository at the pinned commit into the cache
directory, apply the :data:`~dsinfra.conformance.rules.RULES` that name them,
run the file under ``python -m dsinfra run`` (so that DeepSeek's import
names are dsinfra's; the runner calls it as ``python -m dsinfra.run_aliased``,
which skips loading the other commands) with a timeout, and record pass, fail or timeout. Prints
a table and writes JSON.

``--jobs N`` runs N cases at once (default 1). Each case gets an equal share
of the machine's cores as its thread count (``OMP_NUM_THREADS``, shared again
among a case's nodes), unless the environment sets ``OMP_NUM_THREADS`` itself. Two
runs of torch's default thread count on the same cores make every parallel
operation wait for a descheduled thread of the other: small operations then
take a scheduler time slice each, several times their own cost.

    python -m dsinfra.conformance                      # everything, from GitHub
    python -m dsinfra.conformance --mirror DIR --only 'DualPipe*' 'EPLB*'
    python -m dsinfra.conformance --jobs 2 --only 'FlashMLA*'
    python -m dsinfra.conformance --list | --rules
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import fnmatch
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import dsinfra
from dsinfra.conformance import rules as rules_module
from dsinfra.conformance import sources
from dsinfra.conformance.suite import CASES, Case

README_SCRIPT = "readme_example.py"


@dataclasses.dataclass
class Result:
    case: str
    repo: str
    file: str
    label: str
    commit: str
    when: str
    result: str  # pass, fail, timeout or error (could not be prepared)
    seconds: float
    detail: str = ""
    rules: list[str] = dataclasses.field(default_factory=list)
    logs: list[str] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class Prepared:
    entry: Path
    environment: dict[str, str]
    rules: list[str]
    expected_output: str | None  # a README example's printed output


def readme_example(readme: str) -> tuple[str, str]:
    """The first ``python`` block of a README and the output it shows: the
    ``#``-comment lines after ``# Output:``, uncommented."""
    match = re.search(r"```\s*python\s*\n(.*?)```", readme, re.S)
    if match is None:
        raise rules_module.RuleError("the README has no ```python block")
    code = match.group(1)
    shown = code.partition("# Output:")[2]
    output = [re.sub(r"^\s*# ?", "", line) for line in shown.splitlines() if line.strip()]
    return code, "\n".join(output)


def prepare(case: Case, git_dir: Path, directory: Path, rules: Sequence[rules_module.Rule]) -> Prepared:
    """The case's files, adapted, in ``directory`` (emptied first)."""
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    written = sources.extract(git_dir, case.commit, case.extracted_paths(), directory)
    expected = None
    if case.is_readme:
        code, expected = readme_example((directory / case.path).read_text())
        entry_name = README_SCRIPT
        (directory / entry_name).write_text(code)
        python_files = {entry_name: case.file}
    else:
        entry_name = case.path
        python_files = {path: f"{case.repo}@{case.commit}:{path}" for path in written if path.endswith(".py")}
    applied: list[str] = []
    for path, file in python_files.items():
        source, names = rules_module.adapt_source((directory / path).read_text(), file, rules)
        if path == entry_name:
            code, patches = rules_module.prelude(case.file, rules)
            source = rules_module.insert_prelude(source, code)
            names += patches
        (directory / path).write_text(source)
        applied += [name for name in names if name not in applied]
    variables, names = rules_module.environment(case.file, rules)
    return Prepared(directory / entry_name, variables, applied + names, expected)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def cores() -> int:
    """The cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def launch(
    case: Case, prepared: Prepared, cwd: Path, outputs: list[tuple[Path, Path]], timeout: float, threads: int | None = None
) -> tuple[str, float]:
    """Run the case's processes, one per node, node ``i`` writing its stdout
    and stderr to the files ``outputs[i]``; returns (pass, fail or timeout,
    seconds). A failed node ends the others. ``threads``: the case's share of
    the cores, split among its nodes as their ``OMP_NUM_THREADS`` unless the
    environment sets it."""
    dsinfra_root = os.path.dirname(os.path.dirname(os.path.abspath(dsinfra.__file__)))
    share = {} if threads is None or "OMP_NUM_THREADS" in os.environ else {"OMP_NUM_THREADS": str(max(1, threads // case.nodes))}
    environment = {
        **os.environ,
        **share,
        **prepared.environment,
        "PYTHONPATH": os.pathsep.join(filter(None, [dsinfra_root, os.environ.get("PYTHONPATH")])),
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
    }
    command = [sys.executable, "-m", "dsinfra.run_aliased", str(prepared.entry), *case.args]  # python -m dsinfra run
    start = time.perf_counter()
    processes = []
    for node, (stdout, stderr) in enumerate(outputs):
        node_env = environment if case.nodes == 1 else {**environment, "WORLD_SIZE": str(case.nodes), "RANK": str(node)}
        with open(stdout, "w") as out, open(stderr, "w") as err:
            processes.append(subprocess.Popen(command, cwd=cwd, env=node_env, stdout=out, stderr=err, start_new_session=True))
    outcome = None
    while outcome is None:
        codes = [process.poll() for process in processes]
        if any(code for code in codes):
            outcome = "fail"
        elif all(code == 0 for code in codes):
            outcome = "pass"
        elif time.perf_counter() - start > timeout:
            outcome = "timeout"
        else:
            time.sleep(0.2)
    for process in processes:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    return outcome, time.perf_counter() - start


def last_error(text: str) -> str:
    """The last exception line of a run's output (else its last line), shortened."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    errors = [line for line in lines if re.match(r"^([\w.]+(Error|Exception|Exit)|AssertionError)\b", line)]
    line = (errors or lines or [""])[-1]
    return line if len(line) <= 200 else line[:197] + "..."


_preparing = threading.Lock()  # one case at a time clones, fetches and extracts


def run_case(
    case: Case, cache: Path, mirror: str | None, rules: Sequence[rules_module.Rule], timeout: float | None,
    threads: int | None = None,
) -> Result:
    """Prepare and run one case (``threads``: its share of the cores, as :func:`launch`)."""
    slug = re.sub(r"[^\w.@-]+", "_", case.name)
    directory = cache / "work" / slug
    result = Result(case.name, case.repo, case.path, case.label, case.commit, case.when, "error", 0.0)
    try:
        with _preparing:
            git_dir = sources.repository(case.repo, case.commit, cache, sources.source_of(case.repo, mirror))
            prepared = prepare(case, git_dir, directory, rules)
    except (sources.SourceError, rules_module.RuleError, OSError) as error:
        result.detail = str(error)
        return result
    result.rules = prepared.rules
    (cache / "logs").mkdir(parents=True, exist_ok=True)
    names = [slug] if case.nodes == 1 else [f"{slug}.node{node}" for node in range(case.nodes)]
    outputs = [(cache / "logs" / f"{name}.out", cache / "logs" / f"{name}.err") for name in names]
    result.logs = [str(path) for pair in outputs for path in pair]
    limit = timeout or case.timeout
    result.result, result.seconds = launch(case, prepared, directory, outputs, limit, threads)
    printed = "\n".join(stdout.read_text(errors="replace") for stdout, _ in outputs)
    errors = "\n".join(stderr.read_text(errors="replace") for _, stderr in outputs)
    if result.result == "pass" and prepared.expected_output is not None:
        printed = "\n".join(line.rstrip() for line in printed.strip().splitlines())
        if printed != prepared.expected_output:
            result.result, result.detail = "fail", f"printed {printed!r}; the README shows {prepared.expected_output!r}"
    elif result.result == "fail":
        result.detail = last_error(errors) or last_error(printed)
    elif result.result == "timeout":
        result.detail = f"no result within {limit:.0f} s"
    return result


def format_seconds(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes = round(seconds / 60)
    return f"{minutes} min" if minutes < 60 else f"{minutes // 60} h {minutes % 60:02d} min"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    cells = [[str(cell).replace("|", "\\|") for cell in row] for row in rows]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in cells])


def results_table(results: Sequence[Result]) -> str:
    rows = [
        (f"{r.repo} {r.file}" + (f" [{r.label}]" if r.label else ""), f"{r.commit} ({r.when})",
         r.result, format_seconds(r.seconds), r.detail)
        for r in results
    ]
    return markdown_table(("upstream file", "commit", "result", "time", "detail"), rows)


def rules_table(rules: Sequence[rules_module.Rule]) -> str:
    rows = [(rule.name, type(rule).__name__, ", ".join(rule.files), rule.why) for rule in rules]
    return markdown_table(("rule", "kind", "files", "why it changes no check"), rows)


def selected(cases: Sequence[Case], patterns: Sequence[str]) -> list[Case]:
    if not patterns:
        return list(cases)
    return [case for case in cases if any(fnmatch.fnmatchcase(case.name, pattern) for pattern in patterns)]


def default_cache() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "dsinfra" / "conformance"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="upstream-conformance", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--cache", type=Path, default=default_cache(), help="where repositories, adapted files and logs go (default: %(default)s)"
    )
    parser.add_argument(
        "--mirror", help="clone from local repositories instead of GitHub: a path with {repo} in it, or a directory holding <Repo>"
    )
    parser.add_argument(
        "--only", nargs="+", default=[], metavar="PATTERN", help="run the cases whose names match (shell patterns, e.g. 'DualPipe*')"
    )
    parser.add_argument(
        "--timeout", type=float, help="every case's timeout in seconds (default: each case's own, sized for a quiet 2-core machine)"
    )
    parser.add_argument(
        "--jobs", type=int, default=1, help="cases to run at once, the cores shared out among them as their threads (default: 1)"
    )
    parser.add_argument("--json", type=Path, help="where to write the results (default: CACHE/results.json)")
    parser.add_argument("--list", action="store_true", help="list the cases and stop")
    parser.add_argument("--rules", action="store_true", help="print the adaptation rules and stop")
    args = parser.parse_args(argv)

    cases = selected(CASES, args.only)
    if args.list:
        print("\n".join(case.name for case in cases))
        return 0
    if args.rules:
        print(rules_table(rules_module.RULES))
        return 0
    if not cases:
        parser.error(f"no case matches {' '.join(args.only)} (see --list)")
    if args.jobs < 1:
        parser.error(f"--jobs must be at least 1; got {args.jobs}")
    threads = max(1, cores() // args.jobs)

    def run(case: Case) -> Result:
        print(f"{case.name} ...", flush=True)
        result = run_case(case, args.cache, args.mirror, rules_module.RULES, args.timeout, threads)
        print(f"{case.name}: {result.result} ({format_seconds(result.seconds)})", flush=True)
        return result

    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        results = list(pool.map(run, cases))
    print()
    print(results_table(results))
    path = args.json or args.cache / "results.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "dsinfra": dsinfra.__version__,
        "python": sys.version.split()[0],
        "results": [dataclasses.asdict(result) for result in results],
    }
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nresults: {path}")
    return 0 if all(result.result == "pass" for result in results) else 1
