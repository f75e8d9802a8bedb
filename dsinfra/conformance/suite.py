"""Which of DeepSeek's files the conformance runner runs, at which commits:
each repository's February 2025 release and its current main head (the
commit the mirror holds), with the arguments and the launch each file needs."""

from __future__ import annotations

import dataclasses
import posixpath


@dataclasses.dataclass(frozen=True)
class Case:
    """One run of one upstream file.

    repo: the repository under github.com/deepseek-ai; commit: a commit of it.
    path: the test or example to run, or a README whose ``python`` example runs
        and must print what the README shows after ``# Output:``.
    when: the release the commit stands for, for the table.
    args: command-line arguments; label: names a variant in the table.
    nodes: copies of the script to start, as the nodes of one job (each with
        ``WORLD_SIZE=nodes`` and its ``RANK``, as DeepEP's ``init_dist`` reads them).
    timeout: seconds before the run counts as timed out.
    """

    repo: str
    commit: str
    path: str
    when: str
    args: tuple[str, ...] = ()
    label: str = ""
    nodes: int = 1
    timeout: float = 3600.0

    @property
    def file(self) -> str:
        """``Repo@commit:path``, the name rules match."""
        return f"{self.repo}@{self.commit}:{self.path}"

    @property
    def name(self) -> str:
        return self.file + (f" [{self.label}]" if self.label else "")

    @property
    def is_readme(self) -> bool:
        return self.path.endswith(".md")

    def extracted_paths(self) -> list[str]:
        """What to take from the repository: the file's directory (its helpers
        live beside it), or the file alone at the top level (beside the
        upstream package itself, which must not be taken)."""
        directory = posixpath.dirname(self.path)
        return [directory] if directory and not self.is_readme else [self.path]


FEB = "2025-02"
MAIN = "main"

CASES: list[Case] = [
    # FlashMLA
    Case("FlashMLA", "1aef31d", "tests/test_flash_mla.py", FEB, ("--dtype", "bf16"), "bf16"),
    Case("FlashMLA", "1aef31d", "tests/test_flash_mla.py", FEB, ("--dtype", "fp16"), "fp16"),
    Case("FlashMLA", "1858932", "tests/test_flash_mla_decoding.py", "2025-09", timeout=7200.0),
    Case("FlashMLA", "9241ae3", "tests/test_flash_mla_dense_decoding.py", MAIN, timeout=7200.0),
    Case("FlashMLA", "9241ae3", "tests/test_flash_mla_sparse_decoding.py", MAIN, timeout=7200.0),
    Case("FlashMLA", "9241ae3", "tests/test_flash_mla_sparse_prefill.py", MAIN, timeout=7200.0),
    # DeepGEMM
    Case("DeepGEMM", "fbec9e5", "tests/test_core.py", FEB),
    Case("DeepGEMM", "9da4a23", "tests/test_core.py", "2025-07"),
    Case("DeepGEMM", "54e2261", "tests/test_fp8_fp4.py", MAIN, timeout=7200.0),
    Case("DeepGEMM", "54e2261", "tests/test_bf16.py", MAIN, timeout=7200.0),
    Case("DeepGEMM", "54e2261", "tests/test_layout.py", MAIN),
    Case("DeepGEMM", "54e2261", "tests/test_attention.py", MAIN),
    # DeepEP
    Case("DeepEP", "77bb07a", "tests/test_intranode.py", FEB),
    Case("DeepEP", "77bb07a", "tests/test_low_latency.py", FEB),
    Case("DeepEP", "77bb07a", "tests/test_internode.py", FEB, label="2 nodes x 8 ranks", nodes=2, timeout=7200.0),
    Case("DeepEP", "dd758ca", "tests/legacy/test_intranode.py", MAIN, ("--num-tokens", "1024"), label="1024 tokens"),
    Case("DeepEP", "dd758ca", "tests/legacy/test_low_latency.py", MAIN),
    Case(
        "DeepEP", "dd758ca", "tests/legacy/test_internode.py", MAIN, ("--num-tokens", "512"),
        label="2 nodes x 8 ranks, 512 tokens", nodes=2, timeout=7200.0,
    ),
    # DualPipe
    Case("DualPipe", "092151c", "example.py", FEB),
    Case("DualPipe", "3da1bbe", "examples/example_dualpipe.py", MAIN),
    Case("DualPipe", "3da1bbe", "examples/example_dualpipev.py", MAIN),
    # EPLB
    Case("EPLB", "3079d71", "README.md", FEB, timeout=300.0),
    Case("EPLB", "d52c72d", "README.md", MAIN, timeout=300.0),
]
