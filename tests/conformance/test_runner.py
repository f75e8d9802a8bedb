"""The conformance runner end to end on a toy upstream repository: cloning
from a mirror, extraction at a commit, rules, the alias, a README example,
two nodes, failures, timeouts, the table and the JSON."""

from __future__ import annotations

import json
import subprocess
import threading

from dsinfra.conformance import runner
from dsinfra.conformance.rules import Environment, Patch, Replace
from dsinfra.conformance.suite import Case

FILES = {
    "toy/__init__.py": "raise ImportError('the upstream package itself is never taken')\n",
    "tests/helper.py": "DEVICE = 'cuda'\n\ndef timer(fn):\n    raise RuntimeError('needs a GPU')\n",
    "tests/test_ok.py": """\
import importlib.util
import os
import sys

import helper

assert helper.DEVICE == "cpu", helper.DEVICE
assert helper.timer(lambda: None) >= 0
assert type(importlib.util.find_spec("dualpipe").loader).__name__ == "_AliasLoader"
assert os.environ["TOY_SETTING"] == "on"
print("ok", sys.argv[1:])
""",
    "tests/test_two_nodes.py": """\
import os
import time

if os.environ["RANK"] == "1":
    raise ValueError(f"node {os.environ['RANK']} of {os.environ['WORLD_SIZE']} fails")
time.sleep(600)  # node 0 waits: the runner ends it when node 1 fails
""",
    "tests/test_slow.py": "import time\ntime.sleep(600)\n",
    "tests/test_threads.py": "import os\nprint(os.environ.get('OMP_NUM_THREADS'))\n",
    "README.md": "# Toy\n\n```python\nprint([1, 2])\nprint('x')\n\n# Output:\n# [1, 2]\n# x\n```\n",
}

RULES = [
    Replace("devices", "why", ("Toy@*:tests/*.py",), pattern=r"'cuda'", replacement="'cpu'"),
    Patch("timers", "why", ("Toy@*:tests/test_ok.py",), stand_ins=(("helper.timer", "do_bench"),)),
    Environment("setting", "why", ("Toy@*:tests/test_ok.py",), variables=(("TOY_SETTING", "on"),)),
]


def toy_repository(root):
    repo = root / "Toy"
    for path, text in FILES.items():
        (repo / path).parent.mkdir(parents=True, exist_ok=True)
        (repo / path).write_text(text)
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", "."], check=True)
    subprocess.run([*git, "commit", "-qm", "toy"], check=True)
    return subprocess.run([*git, "rev-parse", "--short", "HEAD"], check=True, capture_output=True, text=True).stdout.strip()


def test_runner_end_to_end(tmp_path):
    commit = toy_repository(tmp_path)
    cases = [
        Case("Toy", commit, "tests/test_ok.py", "main", ("--flag",), "flagged"),
        Case("Toy", commit, "README.md", "main"),
        Case("Toy", commit, "tests/test_two_nodes.py", "main", nodes=2),
        Case("Toy", commit, "tests/test_slow.py", "main", timeout=1.0),
        Case("Toy", "0000000", "tests/test_ok.py", "old"),
    ]
    mirror, cache = str(tmp_path / "{repo}"), tmp_path / "cache"
    results = [runner.run_case(case, cache, mirror, RULES, timeout=None) for case in cases]

    assert [r.result for r in results] == ["pass", "pass", "fail", "timeout", "error"]
    ok, readme, two_nodes, slow, missing = results
    assert readme.rules == []
    assert ok.rules == ["devices", "timers", "setting"]
    assert open(ok.logs[0]).read() == "ok ['--flag']\n"
    assert not (cache / "work" / f"Toy@{commit}_tests_test_ok.py_flagged_" / "toy").exists()
    assert two_nodes.detail == "ValueError: node 1 of 2 fails" and two_nodes.seconds < 60
    assert [log.rpartition("/")[2] for log in two_nodes.logs] == [
        f"Toy@{commit}_tests_test_two_nodes.py.node{node}.{kind}" for node in (0, 1) for kind in ("out", "err")
    ]
    assert open(two_nodes.logs[1]).read() == "" and "node 1 of 2 fails" in open(two_nodes.logs[3]).read()
    assert slow.detail == "no result within 1 s"
    assert missing.detail.startswith("Toy from") and "has no commit 0000000" in missing.detail

    table = runner.results_table(results).splitlines()
    assert table[0] == "| upstream file | commit | result | time | detail |"
    assert table[2].startswith(f"| Toy tests/test_ok.py [flagged] | {commit} (main) | pass | ")


def test_readme_examples_must_print_what_the_readme_shows(tmp_path):
    toy_repository(tmp_path)
    (tmp_path / "Toy" / "README.md").write_text("```python\nprint(3)\n# Output:\n# 4\n```\n")
    subprocess.run(["git", "-C", str(tmp_path / "Toy"), "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qam", "wrong"], check=True)
    result = runner.run_case(Case("Toy", "HEAD", "README.md", "main"), tmp_path / "cache", str(tmp_path / "{repo}"), RULES, None)
    assert (result.result, result.detail) == ("fail", "printed '3'; the README shows '4'")
    assert runner.readme_example("```python\nprint(1)\n```")[1] == ""


def test_command_line(tmp_path, capsys, monkeypatch):
    assert runner.main(["--list", "--only", "DualPipe*"]) == 0
    listed = capsys.readouterr().out.splitlines()
    assert listed == ["DualPipe@092151c:example.py", "DualPipe@3da1bbe:examples/example_dualpipe.py",
                      "DualPipe@3da1bbe:examples/example_dualpipev.py"]
    assert runner.main(["--rules"]) == 0
    assert "| nccl-to-gloo | Replace |" in capsys.readouterr().out

    def run_case(case, cache, mirror, rules, timeout, threads):
        assert (mirror, timeout, threads) == ("M", 5.0, runner.cores())
        return runner.Result(case.name, case.repo, case.path, case.label, case.commit, case.when, "pass", 1.5)

    monkeypatch.setattr(runner, "run_case", run_case)
    code = runner.main(["--only", "EPLB*", "--cache", str(tmp_path), "--mirror", "M", "--timeout", "5"])
    assert code == 0
    out = capsys.readouterr().out
    assert "| EPLB README.md | d52c72d (main) | pass | 1.5 s |  |" in out
    report = json.loads((tmp_path / "results.json").read_text())
    assert [(r["case"], r["result"]) for r in report["results"]] == [("EPLB@3079d71:README.md", "pass"), ("EPLB@d52c72d:README.md", "pass")]


def test_threads_are_the_cases_share_of_the_cores(tmp_path, monkeypatch):
    commit = toy_repository(tmp_path)
    mirror, cache = str(tmp_path / "{repo}"), tmp_path / "cache"
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)

    def printed(threads, nodes=1):
        case = Case("Toy", commit, "tests/test_threads.py", "main", nodes=nodes)
        result = runner.run_case(case, cache, mirror, RULES, None, threads)
        assert result.result == "pass", result.detail
        return [open(log).read().strip() for log in result.logs[::2]]

    assert printed(None) == ["None"]
    assert printed(3) == ["3"]
    assert printed(3, nodes=2) == ["1", "1"]  # shared among the nodes
    assert printed(1, nodes=2) == ["1", "1"]
    monkeypatch.setenv("OMP_NUM_THREADS", "7")
    assert printed(3) == ["7"]  # the user's setting wins


def test_jobs_run_cases_at_once(tmp_path, capsys, monkeypatch):
    both_running = threading.Barrier(2, timeout=30)
    shares = []

    def run_case(case, cache, mirror, rules, timeout, threads):
        both_running.wait()  # raises BrokenBarrierError unless the other case runs meanwhile
        shares.append(threads)
        return runner.Result(case.name, case.repo, case.path, case.label, case.commit, case.when, "pass", 1.0)

    monkeypatch.setattr(runner, "run_case", run_case)
    monkeypatch.setattr(runner, "cores", lambda: 5)
    assert runner.main(["--only", "EPLB*", "--cache", str(tmp_path), "--jobs", "2"]) == 0
    assert shares == [2, 2]
    out = capsys.readouterr().out
    assert out.index("| EPLB README.md | 3079d71") < out.index("| EPLB README.md | d52c72d")  # the table keeps the cases' order
    assert "EPLB@d52c72d:README.md: pass (1.0 s)" in out
