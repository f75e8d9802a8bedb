import importlib.util
import json

import numpy as np
import pytest
import torch

from dsinfra import cli
from dsinfra.eplb import rebalance_experts
from dsinfra.testing import skewed_loads

WEIGHT = skewed_loads(3, 12, seed=11).round()
ARGS = ["--replicas", "16", "--groups", "4", "--nodes", "2", "--gpus", "8"]


def write(path, weight):
    """``weight`` in the format ``path``'s suffix names."""
    if path.suffix == ".pt":
        torch.save(weight, path)
    elif path.suffix == ".npy":
        np.save(path, weight.numpy())
    elif path.suffix == ".csv":
        np.savetxt(path, weight.numpy(), delimiter=",")
    else:
        path.write_text(json.dumps(weight.tolist()))
    return str(path)


def exit_code(args):
    try:
        return cli.main(args)
    except SystemExit as exit:
        return exit.code


@pytest.mark.parametrize("suffix", [".pt", ".npy", ".csv", ".json"])
def test_every_format(suffix, tmp_path, capsys):
    loads = write(tmp_path / f"loads{suffix}", WEIGHT)
    plan_path = tmp_path / "plan.json"
    assert exit_code(["eplb", "--loads", loads, *ARGS, "--json", str(plan_path)]) == 0
    out = capsys.readouterr().out
    assert "hierarchical policy" in out and "layer  imbalance before  after" in out
    plan = json.loads(plan_path.read_text())
    phy2log, log2phy, logcnt = rebalance_experts(WEIGHT, 16, 4, 2, 8)
    assert plan["phy2log"] == phy2log.tolist() and plan["log2phy"] == log2phy.tolist() and plan["logcnt"] == logcnt.tolist()
    assert len(plan["imbalance_after"]) == 3
    assert all(after < before for before, after in zip(plan["imbalance_before"], plan["imbalance_after"]))
    for layer, (before, after) in enumerate(zip(plan["imbalance_before"], plan["imbalance_after"])):
        assert f"{layer:>5}  {before:>16.3f}  {after:>5.3f}" in out


def test_a_single_layer_csv_and_the_global_policy(tmp_path, capsys):
    loads = tmp_path / "one.csv"
    loads.write_text("# one layer\n" + ",".join(str(x) for x in range(1, 13)) + "\n")
    assert exit_code(["eplb", "--loads", str(loads), "--replicas", "16", "--groups", "4", "--nodes", "3", "--gpus", "8"]) == 2
    assert "num_gpus (8) must be divisible by num_nodes (3)" in capsys.readouterr().err
    assert exit_code(["eplb", "--loads", str(loads), "--replicas", "18", "--groups", "4", "--nodes", "3", "--gpus", "6"]) == 0
    assert "global policy" in capsys.readouterr().out


@pytest.mark.skipif(importlib.util.find_spec("matplotlib") is None, reason="needs matplotlib")
def test_plot(tmp_path, capsys):
    loads, picture = write(tmp_path / "loads.npy", WEIGHT), tmp_path / "placement.png"
    assert exit_code(["eplb", "--loads", loads, *ARGS, "--plot", str(picture), "--plot-layers", "2"]) == 0
    assert picture.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert exit_code(["eplb", "--loads", loads, *ARGS, "--plot", str(picture), "--plot-layers", "3"]) == 2
    assert "--plot-layers: no layer 3" in capsys.readouterr().err


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("missing.csv", None, "missing.csv: no such file"),
        ("loads.txt", "1,2", "unknown format .txt; use .pt, .npy, .csv, .json"),
        ("garbage.pt", "not a tensor", "not a readable .pt file of numbers"),
        ("garbage.npy", "not an array", "not a readable .npy file of numbers"),
        ("words.csv", "a,b\nc,d\n", "not a readable .csv file of numbers"),
        ("ragged.csv", "1,2,3\n4,5\n", "not a readable .csv file of numbers"),
        ("ragged.json", "[[1, 2, 3], [4, 5]]", "not a readable .json file of numbers"),
        ("broken.json", "[[1, 2", "not a readable .json file of numbers"),
        ("strings.json", '[["a", "b"]]', "not a readable .json file of numbers"),
        ("flat.json", "[1, 2, 3]", "expected [layers, experts] numbers; got torch.int64 of shape [3]"),
        ("cube.npy", np.ones((2, 2, 2)), "expected [layers, experts] numbers; got torch.float64 of shape [2, 2, 2]"),
        ("nan.json", "[[1, NaN, 3, 4]]", "weight must hold finite loads >= 0; found nan"),
        ("negative.csv", "1,-2,3,4\n", "weight must hold finite loads >= 0; found -2.0"),
        ("few.csv", "1,2,3,4\n", "num_replicas (2) must be divisible by num_gpus (4)"),
    ],
)
def test_bad_files_give_one_line_and_exit_2(name, content, message, tmp_path, capsys):
    path = tmp_path / name
    if isinstance(content, np.ndarray):
        np.save(path, content)
    elif content is not None:
        path.write_text(content)
    args = ["--replicas", "2", "--groups", "1", "--nodes", "1", "--gpus", "4"] if name == "few.csv" else ARGS
    if name in ("nan.json", "negative.csv"):
        args = ["--replicas", "4", "--groups", "1", "--nodes", "1", "--gpus", "2"]
    assert exit_code(["eplb", "--loads", str(path), *args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("dsinfra eplb: error: ") and message in err, err


def test_unwritable_outputs(tmp_path, capsys):
    loads = write(tmp_path / "loads.json", WEIGHT)
    assert exit_code(["eplb", "--loads", loads, *ARGS, "--json", str(tmp_path / "missing" / "plan.json")]) == 2
    assert "No such file or directory" in capsys.readouterr().err
    if importlib.util.find_spec("matplotlib") is not None:
        assert exit_code(["eplb", "--loads", loads, *ARGS, "--plot", str(tmp_path / "placement.xyz")]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "Format 'xyz' is not supported" in err
