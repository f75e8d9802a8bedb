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
    assert "--gpus (8) must be divisible by --nodes (3)" in capsys.readouterr().err
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
        ("garbage.pt", "not a tensor", "garbage.pt: not a tensor written by torch.save"),
        ("dict.pt", {"loads": 1}, "dict.pt: holds a dict, not a tensor"),
        ("garbage.npy", "not an array", "garbage.npy: not an array of numbers written by numpy.save"),
        ("objects.npy", np.array([[1, None]], dtype=object), "objects.npy: not an array of numbers written by numpy.save"),
        ("words.npy", np.array([["a", "b"]]), "words.npy: holds str32 values, not numbers"),
        ("words.csv", "1,2\n\n# a comment\n3,d\n", "words.csv: line 4, column 2: 'd' is not a number"),
        ("ragged.csv", "1,2,3\n4,5\n", "ragged.csv: line 2 has 2 values, line 1 has 3: one layer a line"),
        ("empty.csv", "# nothing\n", "empty.csv: no numbers in it"),
        ("ragged.json", "[[1, 2, 3], [4, 5]]", "ragged.json: layer 1 has 2 numbers, layer 0 has 3"),
        ("broken.json", "[[1, 2,\n", "broken.json: line 2, column 1: Expecting value"),
        ("strings.json", '[["a", "b"]]', 'strings.json: layer 0, expert 0: "a" is not a number'),
        ("object.json", '{"loads": []}', "object.json: expected a list of layers, each a list of numbers"),
        ("flat.json", "[1, 2, 3]", "flat.json: expected a list of layers, each a list of numbers"),
        ("cube.npy", np.ones((2, 2, 2)), "expected [layers, experts] numbers, at least one of each; got shape [2, 2, 2]"),
        ("nan.json", "[[1, NaN, 3, 4]]", "nan.json: layer 0, expert 1: nan is not a load (a finite number >= 0)"),
        ("negative.csv", "1,2,3,4\n1,-2,3,4\n", "negative.csv: layer 1, expert 1 (line 2, column 2): -2 is not a load"),
        ("few.csv", "1,2,3,4\n", "--replicas (2) must be divisible by --gpus (4)"),
    ],
)
def test_bad_files_give_one_line_and_exit_2(name, content, message, tmp_path, capsys):
    path = tmp_path / name
    if isinstance(content, np.ndarray):
        np.save(path, content, allow_pickle=True)
    elif isinstance(content, dict):
        torch.save(content, path)
    elif content is not None:
        path.write_text(content)
    args = ["--replicas", "2", "--groups", "1", "--nodes", "1", "--gpus", "4"] if name == "few.csv" else ARGS
    if name in ("nan.json", "negative.csv"):
        args = ["--replicas", "4", "--groups", "1", "--nodes", "1", "--gpus", "2"]
    assert exit_code(["eplb", "--loads", str(path), *args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("dsinfra eplb: error: ") and message in err, err
    for internal in ("usecols", "numpy.object_", "numpy.str_", "allow_pickle", "weight", "num_"):
        assert internal not in err


@pytest.mark.parametrize(
    "flag, name, message",
    [
        ("--json", "missing/plan.json", "--json missing/plan.json: cannot write there (No such file or directory)"),
        ("--json", ".", "--json .: is a folder"),
        ("--plot", "missing/placement.png", "--plot missing/placement.png: cannot write there"),
        ("--plot", "placement.xyz", "--plot placement.xyz: unknown picture format xyz"),
    ],
)
def test_output_paths_are_checked_before_planning(flag, name, message, tmp_path, capsys, monkeypatch):
    if flag == "--plot" and importlib.util.find_spec("matplotlib") is None:
        pytest.skip("needs matplotlib")
    loads = write(tmp_path / "loads.json", WEIGHT)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("dsinfra.eplb.cli.rebalance_experts", lambda *a: pytest.fail("planned before checking " + flag))
    assert exit_code(["eplb", "--loads", loads, *ARGS, flag, name]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["loads.json"]


@pytest.mark.skipif(importlib.util.find_spec("matplotlib") is None, reason="needs matplotlib")
def test_plot_draws_every_layer_up_to_8_else_the_most_imbalanced(tmp_path, capsys, monkeypatch):
    drawn = {}
    monkeypatch.setattr("dsinfra.eplb.plot.draw_placement", lambda *a, title="", **k: drawn.update(layers=a[5], title=title))
    weight = torch.ones(10, 12, dtype=torch.float64)
    weight[[2, 5, 6, 7, 8, 9, 1, 0], 0] = torch.arange(100.0, 900.0, 100.0, dtype=torch.float64)  # layers 3 and 4 stay even
    loads = write(tmp_path / "loads.pt", weight)
    assert exit_code(["eplb", "--loads", loads, *ARGS, "--plot", str(tmp_path / "p.png")]) == 0
    assert drawn == {"layers": [0, 1, 2, 5, 6, 7, 8, 9], "title": "the 8 most imbalanced of 10 layers (without replicas)"}
    assert "p.png: the 8 most imbalanced of 10 layers" in capsys.readouterr().out
    write(tmp_path / "loads.pt", weight[:8])
    assert exit_code(["eplb", "--loads", loads, *ARGS, "--plot", str(tmp_path / "p.png")]) == 0
    assert drawn == {"layers": list(range(8)), "title": ""}
    assert exit_code(["eplb", "--loads", loads, *ARGS, "--plot", str(tmp_path / "p.png"), "--plot-layers", *["1"] * 17]) == 2
    assert "--plot-layers: at most 16 layers fit a picture; got 17" in capsys.readouterr().err
