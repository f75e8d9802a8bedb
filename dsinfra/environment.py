"""What machine and software this is: for ``python -m dsinfra info`` and for
every benchmark report."""

from __future__ import annotations

import os
import platform

import numpy
import torch

import dsinfra
from dsinfra import backend


def cpu_name() -> str:
    """The CPU's model name (from /proc/cpuinfo where there is one)."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def versions() -> dict[str, str | None]:
    return {
        "dsinfra": dsinfra.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": backend.triton_version(),
        "numpy": numpy.__version__,
        "cuda": torch.version.cuda,
        "hip": torch.version.hip,
    }


def gpus() -> list[dict[str, object]]:
    if not torch.cuda.is_available():
        return []
    found = []
    for index in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(index)
        found.append(
            {
                "index": index,
                "name": props.name,
                "capability": f"{props.major}.{props.minor}",
                "multiprocessors": props.multi_processor_count,
                "memory_gib": round(props.total_memory / 2**30, 1),
            }
        )
    return found


def machine() -> dict[str, object]:
    return {
        "hostname": platform.node(),
        "os": f"{platform.system()} {platform.release()}",
        "cpu": cpu_name(),
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpus": gpus(),
    }


def settings() -> dict[str, str | None]:
    """The environment variables that steer dsinfra."""
    return {name: os.environ.get(name) for name in ("DSINFRA_BACKEND", "DSINFRA_CHECKS", "TRITON_INTERPRET")}
