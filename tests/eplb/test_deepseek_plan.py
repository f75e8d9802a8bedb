"""``rebalance_experts(..., plan="deepseek")``: DeepSeek's plan exactly.

Checked against a plain, layer-by-layer reading of DeepSeek's algorithm (below)
on random problems, and against the tensors DeepSeek's own ``eplb.py`` returns
for its README's example (recorded from runs of its releases 3079d71 and
d52c72d; the README prints the phy2log of the first case)."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dsinfra.eplb import logical_to_physical_map, rebalance_experts
from dsinfra.testing import generator
from tests.eplb.plans import check_plan
from tests.eplb.test_planner import problems

README_WEIGHT = [[90, 132, 40, 61, 104, 165, 39, 4, 73, 56, 183, 86],
                 [20, 107, 104, 64, 19, 197, 187, 157, 172, 86, 16, 27]]
README_PRINTED = """\
tensor([[ 5,  6,  5,  7,  8,  4,  3,  4, 10,  9, 10,  2,  0,  1, 11,  1],
        [ 7, 10,  6,  8,  6, 11,  8,  9,  2,  4,  5,  1,  5,  0,  3,  1]])"""
README_LOG2PHY = [[[12, -1], [15, 13], [11, -1], [6, -1], [7, 5], [0, 2], [1, -1], [3, -1], [4, -1], [9, -1], [8, 10], [14, -1]],
                  [[13, -1], [15, 11], [8, -1], [14, -1], [9, -1], [10, 12], [2, 4], [0, -1], [6, 3], [7, -1], [1, -1], [5, -1]]]
README_LOGCNT = [[1, 2, 1, 1, 2, 2, 1, 1, 1, 1, 2, 1], [1, 2, 1, 1, 1, 2, 2, 1, 2, 1, 1, 1]]
# The same loads under the global policy (3 groups on 2 nodes), where the releases differ.
GLOBAL_LOGCNT = [[1, 2, 1, 1, 2, 2, 1, 1, 1, 1, 2, 1], [1, 1, 1, 1, 1, 2, 2, 2, 2, 1, 1, 1]]
GLOBAL = {
    "deepseek": (
        [[10, 6, 10, 7, 0, 2, 11, 4, 5, 9, 5, 4, 8, 3, 1, 1], [1, 10, 2, 4, 5, 11, 5, 0, 6, 7, 6, 3, 8, 8, 9, 7]],
        [[[4, -1], [14, 15], [5, -1], [13, -1], [11, 7], [8, 10], [1, -1], [3, -1], [12, -1], [9, -1], [0, 2], [6, -1]],
         [[7, -1], [0, -1], [2, -1], [11, -1], [3, -1], [4, 6], [8, 10], [15, 9], [12, 13], [14, -1], [1, -1], [5, -1]]],
    ),
    "deepseek-2025-02": (
        [[0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 10, 5, 1, 4], [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 5, 6, 8, 7]],
        [[[0, -1], [1, 14], [2, -1], [3, -1], [4, 15], [5, 13], [6, -1], [7, -1], [8, -1], [9, -1], [10, 12], [11, -1]],
         [[0, -1], [1, -1], [2, -1], [3, -1], [4, -1], [5, 12], [6, 13], [7, 15], [8, 14], [9, -1], [10, -1], [11, -1]]],
    ),
}
PLANS = list(GLOBAL)


@pytest.mark.parametrize("plan", PLANS)
def test_readme_example(plan):
    weight = torch.tensor(README_WEIGHT)
    phy2log, log2phy, logcnt = rebalance_experts(weight, 16, 4, 2, 8, plan=plan)
    assert str(phy2log) == README_PRINTED
    assert log2phy.tolist() == README_LOG2PHY and logcnt.tolist() == README_LOGCNT
    phy2log, log2phy, logcnt = rebalance_experts(weight, 16, 3, 2, 8, plan=plan)
    assert (phy2log.tolist(), log2phy.tolist()) == GLOBAL[plan] and logcnt.tolist() == GLOBAL_LOGCNT


# A plain reading of DeepSeek's algorithm, one layer at a time.


def pack(weights: torch.Tensor, num_packs: int) -> list[list[int]]:
    """Greedy packing of float32 ``weights`` into packs of equal item counts:
    items in ``torch.sort(descending=True)`` order, each into the lightest pack
    with room (first such pack on equal loads), loads added in float32. As
    many items as packs: item i into pack i."""
    per_pack = len(weights) // num_packs
    if per_pack == 1:
        return [[i] for i in range(num_packs)]
    packs = [[] for _ in range(num_packs)]
    loads = [np.float32(0)] * num_packs
    for item in weights.sort(descending=True).indices.tolist():
        best = None
        for p in range(num_packs):
            if len(packs[p]) < per_pack and (best is None or loads[p] < loads[best]):
                best = p
        packs[best].append(item)
        loads[best] = np.float32(loads[best] + np.float32(weights[item].item()))
    return packs


def replicate(loads: torch.Tensor, num_replicas: int) -> list[tuple[int, int]]:
    """(expert, rank) of every replica: one of each expert, then each extra one
    to the expert with the largest float32 load per replica (first on ties)."""
    counts = [1] * len(loads)
    replicas = [(e, 0) for e in range(len(loads))]
    for _ in range(num_replicas - len(loads)):
        per_replica = [np.float32(loads[e].item()) / np.float32(counts[e]) for e in range(len(loads))]
        expert = max(range(len(loads)), key=lambda e: (per_replica[e], -e))
        replicas.append((expert, counts[expert]))
        counts[expert] += 1
    return replicas


def plan_layer(loads: torch.Tensor, num_replicas, num_groups, num_nodes, num_gpus) -> list[tuple[int, int]]:
    """(logical expert, replica rank) in every slot of one layer, hierarchically."""
    group_size = len(loads) // num_groups
    group_loads = loads.view(1, num_groups, group_size).sum(-1)[0]
    slots = []
    for groups in pack(group_loads, num_nodes):
        experts = [g * group_size + i for g in groups for i in range(group_size)]
        replicas = replicate(loads[experts], num_replicas // num_nodes)
        counts = [sum(e == x for x, _ in replicas) for e in range(len(experts))]
        replica_loads = [np.float32(loads[experts[e]].item()) / np.float32(counts[e]) for e, _ in replicas]
        replica_loads = torch.tensor(replica_loads, dtype=torch.float32)
        for gpu in pack(replica_loads, num_gpus // num_nodes):
            slots += [(experts[replicas[r][0]], replicas[r][1]) for r in gpu]
    return slots


def read_plan(weight, num_replicas, num_groups, num_nodes, num_gpus, plan):
    loads = weight.float()
    num_experts = loads.shape[1]
    layers = []
    for layer_loads in loads:
        if num_groups % num_nodes == 0:
            layers.append(plan_layer(layer_loads, num_replicas, num_groups, num_nodes, num_gpus))
        elif plan == "deepseek":
            layers.append(plan_layer(layer_loads, num_replicas, 1, 1, num_gpus))
        else:
            layers.append(replicate(layer_loads, num_replicas))
    phy2log = torch.tensor([[expert for expert, _ in slots] for slots in layers], dtype=torch.int64)
    logcnt = torch.stack([torch.bincount(row, minlength=num_experts) for row in phy2log])
    log2phy = torch.full((len(layers), num_experts, int(logcnt.max())), -1, dtype=torch.int64)
    for layer, slots in enumerate(layers):
        for slot, (expert, rank) in enumerate(slots):
            log2phy[layer, expert, rank] = slot
    return phy2log, log2phy, logcnt


@settings(max_examples=150)
@given(problems(), st.sampled_from(PLANS), st.sampled_from([torch.int64, torch.float32, torch.float64, torch.bfloat16]))
def test_matches_a_plain_reading_of_deepseeks_algorithm(problem, plan, dtype):
    weight, *args = problem
    weight = weight.to(dtype)
    got = rebalance_experts(weight, *args, plan=plan)
    expected = read_plan(weight, *args, plan)
    for name, a, b in zip(("phy2log", "log2phy", "logcnt"), got, expected):
        assert torch.equal(a, b), (name, a, b)


@pytest.mark.parametrize("num_groups, num_nodes", [(1, 1), (3, 2)])
def test_many_ties_in_wide_layers(num_groups, num_nodes):
    """160 replicas in one node: wide enough for torch.sort's order of ties to matter."""
    weight = torch.randint(0, 3, (2, 144), generator=generator(7))
    for plan in PLANS:
        got = rebalance_experts(weight, 160, num_groups, num_nodes, 8, plan=plan)
        expected = read_plan(weight, 160, num_groups, num_nodes, 8, plan)
        assert all(torch.equal(a, b) for a, b in zip(got, expected)), plan


def test_plans_are_plans_and_the_default_is_dsinfras(monkeypatch):
    weight = torch.tensor(README_WEIGHT)
    phy2log, log2phy, logcnt = deepseek = rebalance_experts(weight, 16, 4, 2, 8, plan="deepseek")
    ascending, counts = logical_to_physical_map(phy2log, 12)
    check_plan(weight, (phy2log, ascending, counts), 16, 4, 2, 8)
    assert torch.equal(counts, logcnt)
    unused = log2phy < 0  # the same slots, listed first replica first
    assert torch.equal(log2phy.masked_fill(unused, 16).sort(-1).values.masked_fill(unused, -1), ascending)
    balanced = rebalance_experts(weight, 16, 4, 2, 8)
    assert not torch.equal(balanced[0], phy2log)
    monkeypatch.setenv("DSINFRA_EPLB_PLAN", "deepseek")
    assert all(torch.equal(a, b) for a, b in zip(rebalance_experts(weight, 16, 4, 2, 8), deepseek))
    assert torch.equal(rebalance_experts(weight, 16, 4, 2, 8, plan="balanced")[0], balanced[0])


def test_bad_plans(monkeypatch):
    weight = torch.tensor(README_WEIGHT)
    with pytest.raises(ValueError, match="plan must be one of balanced, deepseek, deepseek-2025-02; got 'greedy'"):
        rebalance_experts(weight, 16, 4, 2, 8, plan="greedy")
    monkeypatch.setenv("DSINFRA_EPLB_PLAN", "DeepSeek")
    with pytest.raises(ValueError, match="DSINFRA_EPLB_PLAN must be one of balanced, deepseek, deepseek-2025-02; got 'DeepSeek'"):
        rebalance_experts(weight, 16, 4, 2, 8)
    with pytest.raises(ValueError, match='weight holds loads too large for float32, in which plan="deepseek" computes'):
        rebalance_experts(torch.full((1, 4), 1e39, dtype=torch.float64), 4, 1, 1, 2, plan="deepseek")
