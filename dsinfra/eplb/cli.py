"""Plan expert replication and placement (DeepSeek EPLB) from a file of expert
loads, [layers, experts] in .pt, .npy, .csv or .json. Prints every layer's
imbalance (max GPU load / mean GPU load) before (no replicas, experts in order)
and after; writes the plan as JSON (--json) and draws it (--plot).

    python -m dsinfra eplb --loads loads.csv --replicas 288 --groups 8 --nodes 4 --gpus 32 --json plan.json
"""

from __future__ import annotations

import argparse
import importlib.util
import json
from pathlib import Path

import numpy as np
import torch

from dsinfra.cli import CommandError
from dsinfra.eplb.loads import gpu_loads, imbalance, in_order_gpu_loads
from dsinfra.eplb.planner import rebalance_experts

FORMATS = (".pt", ".npy", ".csv", ".json")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--loads", required=True, metavar="FILE", help=f"[layers, experts] loads: {', '.join(FORMATS)}")
    parser.add_argument("--replicas", required=True, type=int, help="physical experts per layer (a multiple of --gpus)")
    parser.add_argument("--groups", required=True, type=int, help="expert groups (dividing the number of experts)")
    parser.add_argument("--nodes", required=True, type=int, help="server nodes (dividing --gpus)")
    parser.add_argument("--gpus", required=True, type=int, help="GPUs in all")
    parser.add_argument("--json", metavar="PATH", help="write the plan (phy2log, log2phy, logcnt, imbalance) here")
    parser.add_argument("--plot", metavar="PATH", help="draw the placement here (PNG; needs matplotlib)")
    parser.add_argument(
        "--plot-layers", type=int, nargs="+", metavar="LAYER", help="the layers to draw (default: the first two)"
    )


def read_loads(path: str) -> torch.Tensor:
    """The [layers, experts] loads in ``path``, as float64; CommandError if it
    cannot be read or holds anything else."""
    suffix = Path(path).suffix.lower()
    if suffix not in FORMATS:
        raise CommandError(f"--loads {path}: unknown format {suffix or '(no suffix)'}; use {', '.join(FORMATS)}")
    if not Path(path).is_file():
        raise CommandError(f"--loads {path}: no such file")
    try:
        if suffix == ".pt":
            loads = torch.load(path, map_location="cpu", weights_only=True)
        elif suffix == ".npy":
            loads = np.load(path, allow_pickle=False)
        elif suffix == ".csv":
            loads = np.loadtxt(path, delimiter=",", ndmin=2)
        else:
            with open(path) as file:
                loads = json.load(file)
        if not isinstance(loads, torch.Tensor):
            loads = torch.from_numpy(np.asarray(loads))
    except OSError as error:
        raise CommandError(f"--loads {path}: {error.strerror or error}") from None
    except Exception as error:  # whatever a malformed file makes a reader raise
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CommandError(f"--loads {path}: not a readable {suffix} file of numbers ({reason})") from None
    if loads.dim() != 2 or loads.dtype == torch.bool or loads.is_complex():
        raise CommandError(
            f"--loads {path}: expected [layers, experts] numbers; got {loads.dtype} of shape {list(loads.shape)}"
        )
    return loads.to(torch.float64)


def run(args: argparse.Namespace) -> int:
    weight = read_loads(args.loads)
    layers = args.plot_layers if args.plot_layers is not None else list(range(min(2, weight.shape[0])))
    if args.plot:
        bad = [layer for layer in layers if not 0 <= layer < weight.shape[0]]
        if bad:
            raise CommandError(f"--plot-layers: no layer {bad[0]}; the file has layers 0 to {weight.shape[0] - 1}")
        if importlib.util.find_spec("matplotlib") is None:
            raise CommandError("--plot needs matplotlib: pip install matplotlib")
    try:
        phy2log, log2phy, logcnt = rebalance_experts(weight, args.replicas, args.groups, args.nodes, args.gpus)
    except (TypeError, ValueError) as error:
        raise CommandError(str(error)) from None
    before = imbalance(in_order_gpu_loads(weight, args.gpus))
    after = imbalance(gpu_loads(weight, phy2log, args.gpus))
    policy = "hierarchical" if args.groups % args.nodes == 0 else "global"
    print(f"{weight.shape[0]} layers, {weight.shape[1]} experts -> {args.replicas} replicas on {args.nodes} nodes x "
          f"{args.gpus // args.nodes} GPUs ({policy} policy)")
    print("layer  imbalance before  after")
    for layer, (old, new) in enumerate(zip(before.tolist(), after.tolist())):
        print(f"{layer:>5}  {old:>16.3f}  {new:>5.3f}")
    print(f" mean  {before.mean():>16.3f}  {after.mean():>5.3f}")
    if args.json:
        plan = {
            "num_replicas": args.replicas, "num_groups": args.groups, "num_nodes": args.nodes, "num_gpus": args.gpus,
            "policy": policy, "phy2log": phy2log.tolist(), "log2phy": log2phy.tolist(), "logcnt": logcnt.tolist(),
            "imbalance_before": before.tolist(), "imbalance_after": after.tolist(),
        }
        _write(args.json, lambda path: Path(path).write_text(json.dumps(plan) + "\n"))
        print(f"wrote {args.json}")
    if args.plot:
        from dsinfra.eplb.plot import draw_placement

        _write(args.plot, lambda path: draw_placement(weight, phy2log, args.nodes, args.gpus, path, layers))
        print(f"wrote {args.plot}")
    return 0


def _write(path: str, write) -> None:
    """``write(path)``, with a failure (no such folder, a format matplotlib does not know) as a CommandError."""
    try:
        write(path)
    except OSError as error:
        raise CommandError(f"{path}: {error.strerror or error}") from None
    except ValueError as error:
        raise CommandError(f"{path}: {str(error).splitlines()[0]}") from None
