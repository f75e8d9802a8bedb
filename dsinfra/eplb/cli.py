"""Plan expert replication and placement (DeepSeek EPLB) from a file of expert
loads, [layers, experts] in .pt, .npy, .csv or .json. Prints every layer's
imbalance (max GPU load / mean GPU load) before (no replicas, experts in order)
and after; writes the plan as JSON (--json) and draws it (--plot).

    python -m dsinfra eplb --loads loads.csv --replicas 288 --groups 8 --nodes 4 --gpus 32 --json plan.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from dsinfra.cli import CommandError, check_output, in_flag_terms
from dsinfra.eplb.loads import gpu_loads, imbalance, in_order_gpu_loads
from dsinfra.eplb.planner import rebalance_experts

FORMATS = (".pt", ".npy", ".csv", ".json")
FLAGS = {
    "num_replicas": "--replicas",
    "num_groups": "--groups",
    "num_nodes": "--nodes",
    "num_gpus": "--gpus",
    "num_logical_experts": "the experts in --loads",
    "weight": "--loads",
}
PLOT_LAYERS = 8  # drawn by default: every layer up to this many, else the most imbalanced
MAX_PLOT_LAYERS = 16


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--loads", required=True, metavar="FILE", help=f"[layers, experts] loads (tokens): {', '.join(FORMATS)}")
    parser.add_argument("--replicas", required=True, type=int, help="physical experts per layer (a multiple of --gpus)")
    parser.add_argument("--groups", required=True, type=int, help="expert groups (dividing the number of experts)")
    parser.add_argument("--nodes", required=True, type=int, help="server nodes (dividing --gpus)")
    parser.add_argument("--gpus", required=True, type=int, help="GPUs in all")
    parser.add_argument("--json", metavar="PATH", help="write the plan (phy2log, log2phy, logcnt, imbalance) here")
    parser.add_argument("--plot", metavar="PATH", help="draw the placement here (.png, .svg, .pdf; needs matplotlib)")
    parser.add_argument(
        "--plot-layers",
        type=int,
        nargs="+",
        metavar="LAYER",
        help=f"the layers to draw, at most {MAX_PLOT_LAYERS} (default: all up to {PLOT_LAYERS}, "
        f"else the {PLOT_LAYERS} most imbalanced without replicas)",
    )


def read_loads(path: str) -> torch.Tensor:
    """The [layers, experts] loads in ``path``, as float64; CommandError, naming
    the place in the file, if it cannot be read or holds anything but finite
    numbers >= 0."""
    suffix = Path(path).suffix.lower()
    if suffix not in FORMATS:
        raise CommandError(f"--loads {path}: unknown format {suffix or '(no suffix)'}; use {', '.join(FORMATS)}")
    if not Path(path).is_file():
        raise CommandError(f"--loads {path}: no such file")
    lines = None  # the file line of each layer, for a CSV
    try:
        if suffix == ".csv":
            loads, lines = _read_csv(path)
        elif suffix == ".json":
            loads = _read_json(path)
        elif suffix == ".npy":
            loads = _read_npy(path)
        else:
            loads = _read_pt(path)
    except OSError as error:
        raise CommandError(f"--loads {path}: {error.strerror or error}") from None
    except _BadFile as error:
        raise CommandError(f"--loads {path}: {error}") from None
    if loads.dim() != 2 or 0 in loads.shape:
        raise CommandError(f"--loads {path}: expected [layers, experts] numbers, at least one of each; got shape {list(loads.shape)}")
    loads = loads.to(torch.float64)
    bad = (~(torch.isfinite(loads) & (loads >= 0))).nonzero()
    if len(bad):
        layer, expert = bad[0].tolist()
        where = f" (line {lines[layer]}, column {expert + 1})" if lines else ""
        raise CommandError(
            f"--loads {path}: layer {layer}, expert {expert}{where}: {loads[layer, expert].item():g} is not a load "
            "(a finite number >= 0)"
        )
    return loads


class _BadFile(ValueError):
    """What is wrong with a file of loads, in the file's own terms."""


def _read_csv(path: str) -> tuple[torch.Tensor, list[int]]:
    """Comma-separated numbers, a layer a line; blank lines and # comments skipped."""
    rows: list[list[float]] = []
    lines: list[int] = []
    with open(path, newline="") as file:
        for number, line in enumerate(file, 1):
            text = line.split("#")[0].strip()
            if not text:
                continue
            row = []
            for column, cell in enumerate(text.split(","), 1):
                try:
                    row.append(float(cell))
                except ValueError:
                    raise _BadFile(f"line {number}, column {column}: {cell.strip()!r} is not a number") from None
            if rows and len(row) != len(rows[0]):
                raise _BadFile(f"line {number} has {_count(len(row), 'value')}, line {lines[0]} has {len(rows[0])}: one layer a line")
            rows.append(row)
            lines.append(number)
    if not rows:
        raise _BadFile("no numbers in it")
    return torch.tensor(rows, dtype=torch.float64), lines


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _read_json(path: str) -> torch.Tensor:
    """A list of layers, each a list of numbers."""
    with open(path) as file:
        try:
            value = json.load(file)
        except json.JSONDecodeError as error:
            raise _BadFile(f"line {error.lineno}, column {error.colno}: {error.msg}") from None
    if not isinstance(value, list) or not all(isinstance(row, list) for row in value):
        raise _BadFile("expected a list of layers, each a list of numbers")
    rows = []
    for layer, row in enumerate(value):
        if len(row) != len(value[0]):
            raise _BadFile(f"layer {layer} has {_count(len(row), 'number')}, layer 0 has {len(value[0])}")
        rows.append([_json_number(number, layer, expert) for expert, number in enumerate(row)])
    return torch.tensor(rows, dtype=torch.float64).reshape(len(rows), len(rows[0]) if rows else 0)


def _json_number(number: object, layer: int, expert: int) -> float:
    if isinstance(number, bool) or not isinstance(number, (int, float)):
        raise _BadFile(f"layer {layer}, expert {expert}: {json.dumps(number)} is not a number")
    try:
        return float(number)
    except OverflowError:
        raise _BadFile(f"layer {layer}, expert {expert}: {number} is too large") from None


def _read_npy(path: str) -> torch.Tensor:
    """An array of integers or floats written by numpy.save."""
    try:
        array = np.load(path, allow_pickle=False)
    except (ValueError, EOFError):  # not an .npy file, or one of Python objects
        raise _BadFile("not an array of numbers written by numpy.save") from None
    if array.dtype.kind not in "iuf":
        raise _BadFile(f"holds {array.dtype.name} values, not numbers")
    return torch.from_numpy(array.astype(np.float64))


def _read_pt(path: str) -> torch.Tensor:
    """A tensor of real numbers written by torch.save."""
    try:
        value = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # whatever a file that is not a saved tensor makes the unpickler raise
        raise _BadFile("not a tensor written by torch.save") from None
    if not isinstance(value, torch.Tensor):
        raise _BadFile(f"holds a {type(value).__name__}, not a tensor")
    if value.dtype == torch.bool or value.is_complex():
        raise _BadFile(f"holds {str(value.dtype).replace('torch.', '')} values, not real numbers")
    return value


def run(args: argparse.Namespace) -> int:
    weight = read_loads(args.loads)
    for flag in ("--replicas", "--groups", "--nodes", "--gpus"):
        value = getattr(args, flag[2:])
        if value < 1:
            raise CommandError(f"{flag} must be >= 1; got {value}")
    layers = _plot_layers(args, weight) if args.plot else []
    if args.json:
        check_output("--json", args.json)
    if args.plot:
        check_output("--plot", args.plot, picture=True)
    try:
        phy2log, log2phy, logcnt = rebalance_experts(weight, args.replicas, args.groups, args.nodes, args.gpus)
    except (TypeError, ValueError) as error:
        raise in_flag_terms(error, FLAGS) from None
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
        _write("--json", args.json, lambda path: Path(path).write_text(json.dumps(plan) + "\n"))
        print(f"wrote {args.json}")
    if args.plot:
        from dsinfra.eplb.plot import draw_placement

        which = "" if args.plot_layers is not None or len(layers) == weight.shape[0] else (
            f"the {len(layers)} most imbalanced of {weight.shape[0]} layers (without replicas)"
        )
        _write("--plot", args.plot, lambda path: draw_placement(weight, phy2log, args.nodes, args.gpus, path, layers, title=which))
        print(f"wrote {args.plot}" + (f": {which}" if which else ""))
    return 0


def _plot_layers(args: argparse.Namespace, weight: torch.Tensor) -> list[int]:
    """The layers --plot draws: --plot-layers, else every layer up to PLOT_LAYERS,
    else the PLOT_LAYERS most imbalanced ones without replicas, in layer order."""
    num_layers = weight.shape[0]
    if args.plot_layers is not None:
        bad = [layer for layer in args.plot_layers if not 0 <= layer < num_layers]
        if bad:
            raise CommandError(f"--plot-layers: no layer {bad[0]}; the file has layers 0 to {num_layers - 1}")
        if len(args.plot_layers) > MAX_PLOT_LAYERS:
            raise CommandError(f"--plot-layers: at most {MAX_PLOT_LAYERS} layers fit a picture; got {len(args.plot_layers)}")
        return list(args.plot_layers)
    if num_layers <= PLOT_LAYERS:
        return list(range(num_layers))
    skew = imbalance(in_order_gpu_loads(weight, args.gpus))
    return sorted(skew.argsort(descending=True, stable=True)[:PLOT_LAYERS].tolist())


def _write(flag: str, path: str, write) -> None:
    """``write(path)``, with a failure as a CommandError."""
    try:
        write(path)
    except OSError as error:
        raise CommandError(f"{flag} {path}: {error.strerror or error}") from None
