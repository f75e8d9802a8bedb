"""Print dsinfra's and its dependencies' versions, the devices, the settings that
steer dsinfra, and which implementation each operation would use on each device."""

from __future__ import annotations

import argparse
import importlib
import json

import torch

import dsinfra
from dsinfra import backend, environment


def operations() -> dict[str, tuple[str, ...]]:
    """Backend-dispatched operations by component: every subpackage that lists
    them in an ``OPERATIONS`` tuple."""
    found = {}
    for name in dsinfra.subpackages():
        module = importlib.import_module(f"dsinfra.{name}")
        if getattr(module, "OPERATIONS", None):
            found[name] = tuple(module.OPERATIONS)
    return found


def implementations() -> dict[str, dict[str, str]]:
    """For each operation and device, the implementation :func:`backend.choose` picks
    (or why none can serve)."""
    devices = ["cpu"] + [f"cuda:{gpu['index']}" for gpu in environment.gpus()]
    table: dict[str, dict[str, str]] = {}
    for component, names in operations().items():
        for name in names:
            row = table[f"{component}.{name}"] = {}
            for device in devices:
                try:
                    row[device] = backend.choose(name, torch.device(device))
                except (RuntimeError, ValueError) as error:
                    row[device] = f"unavailable: {error}"
    return table


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print the same as one JSON object")


def run(args: argparse.Namespace) -> int:
    report = {
        "versions": environment.versions(),
        "machine": environment.machine(),
        "settings": environment.settings(),
        "implementations": implementations(),
    }
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print("versions")
    for name, version in report["versions"].items():
        print(f"  {name:<10} {version or 'not installed'}")
    machine = report["machine"]
    print("machine")
    print(f"  cpu        {machine['cpu']} ({machine['cpu_cores']} cores, torch uses {machine['torch_threads']} threads)")
    for gpu in machine["gpus"]:
        print(
            f"  cuda:{gpu['index']:<5} {gpu['name']} (sm_{gpu['capability'].replace('.', '')}, "
            f"{gpu['multiprocessors']} SMs, {gpu['memory_gib']} GiB)"
        )
    if not machine["gpus"]:
        print("  gpu        none")
    print("settings")
    for name, value in report["settings"].items():
        print(f"  {name:<16} {value if value is not None else '(unset)'}")
    print("implementations (DSINFRA_BACKEND decides; see docs/backend.md)")
    if not report["implementations"]:
        print("  no backend-dispatched operations are installed yet")
    for operation, row in report["implementations"].items():
        print(f"  {operation}: " + ", ".join(f"{device} -> {impl}" for device, impl in row.items()))
    return 0
