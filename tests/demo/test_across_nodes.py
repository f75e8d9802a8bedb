"""The demo under torchrun on two "nodes" (two launchers on this host), with
expert parallelism spanning them: deep_ep's hierarchical mode, its buffers
sized from the model."""

import json
import os
import socket
import subprocess
import sys

import dsinfra


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_expert_parallelism_across_two_nodes(tmp_path):
    port = _free_port()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.dirname(os.path.dirname(dsinfra.__file__)), os.environ.get("PYTHONPATH", "")]))
    launchers = [
        subprocess.Popen(
            [
                sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "2",
                "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}",
                "-m", "dsinfra", "demo", "--pp", "1", "--ep", "4", "--quick", "--steps", "2", "--out", str(tmp_path / node),
            ],
            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        for node in ("a", "b")
    ]
    try:
        outputs = [launcher.communicate(timeout=280)[0] for launcher in launchers]
    finally:
        for launcher in launchers:
            launcher.kill()
    for launcher, output in zip(launchers, outputs):
        assert launcher.returncode == 0, output[-3000:]
    summaries = [tmp_path / node / "summary.json" for node in ("a", "b") if (tmp_path / node / "summary.json").exists()]
    assert len(summaries) == 1  # written by global rank 0, on one of the nodes
    summary = json.loads(summaries[0].read_text())
    assert len(summary["serving"]) == 4  # every expert-parallel rank served
