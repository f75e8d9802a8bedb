"""Every ```python block in README.md and docs/*.md runs as pasted.

Each block is a complete program: it is written to a file in an empty
temporary folder and run there as ``__main__`` by a process of its own that
finds dsinfra in this checkout, with none of the test suite's settings (no
TRITON_INTERPRET, no DSINFRA_*), as a user who pastes it would run it. The
processes fork from a server that has imported torch and nothing else (a
fresh interpreter per block would spend most of the test importing torch).
Examples that need ranks start them themselves (under
``if __name__ == "__main__":``)."""

from __future__ import annotations

import multiprocessing
import os
import re
import runpy
import sys
import traceback
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
TIMEOUT = 120  # seconds for one block, interpreter start included
FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<ticks>```+)(?P<info>.*)$")
PYTHON_LIKE = {"py", "python3", "pycon", "ipython"}  # tags that would hide a Python block from this test
# ``...`` standing for code left out: a line of its own, a value, an argument (``x[..., :k]`` is fine)
PLACEHOLDER = re.compile(r"^\s*\.\.\.\s*$|=\s*\.\.\.\s*$|[(,]\s*\.\.\.\s*\)")


def fenced_blocks(text: str) -> list[tuple[int, str, str]]:
    """(line of the opening fence, info string, body) of every fenced block in
    Markdown ``text``; the body loses the fence's indentation."""
    blocks, lines, index = [], text.splitlines(), 0
    while index < len(lines):
        opening = FENCE.match(lines[index])
        start, index = index, index + 1
        if not opening:
            continue
        indent, ticks, body = opening["indent"], opening["ticks"], []
        while index < len(lines) and lines[index].strip() != ticks:
            line = lines[index]
            body.append(line[len(indent) :] if line.startswith(indent) else line.lstrip())
            index += 1
        if index == len(lines):
            raise ValueError(f"the block opened on line {start + 1} is never closed")
        blocks.append((start + 1, opening["info"].strip(), "\n".join(body) + "\n"))
        index += 1
    return blocks


def python_blocks() -> list:
    return [
        pytest.param(page, line, body, id=f"{page.relative_to(ROOT)}:{line}")
        for page in PAGES
        for line, info, body in fenced_blocks(page.read_text())
        if info == "python"
    ]


def clean_environment() -> dict[str, str]:
    """This process's environment without the suite's settings, dsinfra found in this checkout."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET" and not k.startswith(("DSINFRA_", "PYTEST_"))}
    env["PYTHONPATH"] = str(ROOT)
    return env


def run_as_main(script: str, environment: dict[str, str], output: str) -> None:
    """In the forked process: the script as ``__main__`` in its own folder, with
    ``environment`` and both output streams going to ``output``."""
    folder = os.path.dirname(script)
    os.chdir(folder)
    os.environ.clear()
    os.environ.update(environment)
    sys.path[:] = [folder, str(ROOT), *(entry for entry in sys.path if entry not in ("", folder, str(ROOT)))]
    sys.argv[:] = [script]
    with open(output, "w") as sink:
        os.dup2(sink.fileno(), 1)
        os.dup2(sink.fileno(), 2)
    try:
        runpy.run_path(script, run_name="__main__")
    except SystemExit as stop:
        code = stop.code if isinstance(stop.code, int) else (stop.code is not None)
        sys.stdout.flush()
        os._exit(code)
    except BaseException:
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


@pytest.fixture(scope="module")
def preloaded():
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["torch"])
    return context


@pytest.mark.parametrize("page, line, code", python_blocks())
def test_python_block_runs_as_pasted(page, line, code, tmp_path, preloaded):
    script, output = tmp_path / "example.py", tmp_path.parent / f"{tmp_path.name}.out"
    script.write_text(code)
    process = preloaded.Process(target=run_as_main, args=(str(script), clean_environment(), str(output)))
    process.start()
    process.join(TIMEOUT)
    if process.exitcode is None:
        process.kill()
        process.join()
    printed = output.read_text(errors="replace") if output.exists() else ""
    assert process.exitcode == 0, f"{page.relative_to(ROOT)}, the block on line {line} (exit {process.exitcode}):\n{printed[-5000:]}"


@pytest.mark.parametrize("page", PAGES, ids=lambda page: str(page.relative_to(ROOT)))
def test_python_blocks_leave_nothing_out(page):
    """A block that runs may still be a sketch that defines what it never calls
    with values it never makes: no ``...`` in place of code."""
    left_out = [
        f"{page.name}:{line + offset + 1}: {code.strip()}"
        for line, info, body in fenced_blocks(page.read_text())
        if info == "python"
        for offset, code in enumerate(body.splitlines())
        if PLACEHOLDER.search(code.split("#")[0])
    ]
    assert not left_out, "code left out of a Python example:\n" + "\n".join(left_out)


@pytest.mark.parametrize("page", PAGES, ids=lambda page: str(page.relative_to(ROOT)))
def test_python_blocks_are_tagged_python(page):
    """A block tagged py, python3, ... would escape the test above."""
    tags = {info.split()[0] for _, info, _ in fenced_blocks(page.read_text()) if info}
    assert not tags & PYTHON_LIKE, f"{page.name}: tag Python blocks ```python"


def test_fenced_blocks_are_found_with_their_lines():
    text = "intro\n```python\nprint(1)\n```\n\n- item\n\n  ```python\n  if True:\n      print(2)\n  ```\n```bash\nls\n```\n"
    assert fenced_blocks(text) == [(2, "python", "print(1)\n"), (8, "python", "if True:\n    print(2)\n"), (12, "bash", "ls\n")]
    with pytest.raises(ValueError, match="never closed"):
        fenced_blocks("```python\nprint(1)\n")
    for left_out in ("q = ...", "    ...", "spawn(check, ...)"):
        assert PLACEHOLDER.search(left_out), left_out
    assert not PLACEHOLDER.search("scales[..., None] * x[..., :k]")
