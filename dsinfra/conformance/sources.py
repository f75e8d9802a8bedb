"""DeepSeek's repositories in a cache directory: a bare clone of each, fetched
from GitHub or from a local clone, and files taken out of it at a commit."""

from __future__ import annotations

import io
import os
import posixpath
import subprocess
import tarfile
from pathlib import Path

GITHUB = "https://github.com/deepseek-ai/{repo}.git"


class SourceError(RuntimeError):
    """A repository or commit that cannot be had."""


def source_of(repo: str, mirror: str | None) -> str:
    """Where to clone ``repo`` from: GitHub, or ``mirror``, a path with
    ``{repo}`` in it or a directory holding ``<repo>`` (a clone or a bare repository)."""
    if mirror is None:
        return GITHUB.format(repo=repo)
    if "{repo}" in mirror:
        return mirror.format(repo=repo)
    return os.path.join(mirror, repo)


def _git(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["git", *args], capture_output=True)


def repository(repo: str, commit: str, cache: Path, source: str) -> Path:
    """The bare clone of ``repo`` in ``cache``, holding ``commit`` (cloned or fetched from ``source`` if needed)."""
    git_dir = cache / "repos" / f"{repo}.git"
    if not git_dir.exists():
        done = _git("clone", "--bare", "--quiet", source, str(git_dir))
        if done.returncode:
            raise SourceError(f"cannot clone {repo} from {source}: {done.stderr.decode().strip()}")
    if _git("--git-dir", str(git_dir), "cat-file", "-e", f"{commit}^{{commit}}").returncode:
        done = _git("--git-dir", str(git_dir), "fetch", "--quiet", source, "+refs/heads/*:refs/heads/*", "+refs/tags/*:refs/tags/*")
        if done.returncode or _git("--git-dir", str(git_dir), "cat-file", "-e", f"{commit}^{{commit}}").returncode:
            raise SourceError(f"{repo} from {source} has no commit {commit} {done.stderr.decode().strip()}".strip())
    return git_dir


def extract(git_dir: Path, commit: str, paths: list[str], destination: Path) -> list[str]:
    """Write the files under ``paths`` at ``commit`` into ``destination``
    (keeping their paths in the repository); returns those paths."""
    done = _git("--git-dir", str(git_dir), "archive", "--format=tar", commit, "--", *paths)
    if done.returncode:
        raise SourceError(f"cannot take {', '.join(paths)} from {git_dir} at {commit}: {done.stderr.decode().strip()}")
    written = []
    with tarfile.open(fileobj=io.BytesIO(done.stdout)) as archive:
        for member in archive.getmembers():
            name = posixpath.normpath(member.name)
            if not member.isfile() or name.startswith(("/", "..")):
                continue
            target = destination / name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(archive.extractfile(member).read())
            written.append(name)
    return written
