"""EPLB planner against DeepSeek's greedy algorithm at DeepSeek-V3 scale: max/mean GPU load and runtime.

The baseline is DeepSeek's published algorithm as EPLB's ``eplb.py`` runs it:
the packings one layer at a time in Python (heaviest item first, into the
lightest pack with room), the replication vectorised over rows (each extra
replica to the expert with the largest load per replica). Both planners get
the same seeded skewed loads (58 layers, 256 experts in 8 groups); the table
gives their mean and worst imbalance (max GPU load / mean GPU load), the floor
no plan can go below once groups sit on their nodes, and the layers where
dsinfra's heaviest GPU is no heavier than the baseline's, and lighter.
"""

from __future__ import annotations

import torch

NUM_LAYERS, NUM_EXPERTS, NUM_GROUPS = 58, 256, 8
# (num_replicas, num_nodes, num_gpus): 8 GPUs per node. The 8 groups split over
# 4 or 8 nodes (hierarchical policy) but not over 5 or 6 (global policy).
CASES = [(288, 4, 32), (320, 4, 32), (320, 8, 64), (288, 6, 48), (320, 5, 40)]


def greedy_pack(loads: list[float], num_packs: int) -> list[list[int]]:
    """Items heaviest first (equal loads: lower index first), each into the
    lightest pack with room (equal loads: lower pack first): the items of every
    pack, in placement order."""
    per_pack = len(loads) // num_packs
    packs: list[list[int]] = [[] for _ in range(num_packs)]
    pack_loads = [0.0] * num_packs
    for item in sorted(range(len(loads)), key=lambda i: -loads[i]):
        pack = min((p for p in range(num_packs) if len(packs[p]) < per_pack), key=pack_loads.__getitem__)
        packs[pack].append(item)
        pack_loads[pack] += loads[item]
    return packs


def greedy_replicate(loads: torch.Tensor, num_replicas: int) -> torch.Tensor:
    """Replica counts [rows, experts]: one extra replica at a time to the expert
    with the largest load per replica (equal: lowest index), every row at once."""
    counts = torch.ones_like(loads, dtype=torch.int64)
    rows = torch.arange(loads.shape[0])
    for _ in range(num_replicas - loads.shape[1]):
        counts[rows, (loads / counts).argmax(1)] += 1
    return counts


def greedy_rebalance_experts(
    weight: torch.Tensor, num_replicas: int, num_groups: int, num_nodes: int, num_gpus: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DeepSeek's EPLB algorithm, with ``dsinfra.eplb.rebalance_experts``'s
    arguments and results: the baseline. No argument checks."""
    from dsinfra.eplb import logical_to_physical_map

    weight = weight.double().cpu()
    if num_groups % num_nodes:  # global policy: one group, one node
        num_groups = num_nodes = 1
    num_layers, num_experts = weight.shape
    group_size = num_experts // num_groups
    gpus_per_node = num_gpus // num_nodes
    group_loads = weight.view(num_layers, num_groups, group_size).sum(2)
    node_experts = [
        [group * group_size + i for group in groups for i in range(group_size)]
        for layer_loads in group_loads.tolist()
        for groups in greedy_pack(layer_loads, num_nodes)
    ]  # [layers * nodes][experts per node]
    node_loads = weight.gather(1, torch.tensor(node_experts).view(num_layers, -1)).view(len(node_experts), -1)
    counts = greedy_replicate(node_loads, num_replicas // num_nodes)
    phy2log = []
    for experts, expert_loads, expert_counts in zip(node_experts, node_loads.tolist(), counts.tolist()):
        replicas = [e for e, count in zip(experts, expert_counts) for _ in range(count)]
        loads = [load / count for load, count in zip(expert_loads, expert_counts) for _ in range(count)]
        phy2log += [replicas[r] for gpu in greedy_pack(loads, gpus_per_node) for r in gpu]
    phy2log = torch.tensor(phy2log).view(num_layers, num_replicas)
    return (phy2log, *logical_to_physical_map(phy2log, num_experts))


def imbalance_floor(weight: torch.Tensor, num_groups: int, num_nodes: int) -> torch.Tensor:
    """The least imbalance any plan reaches once the groups sit on the nodes as
    DeepSeek's packing puts them (both planners do): per layer, the heaviest
    node's load over the mean node load. 1 for the global policy."""
    if num_groups % num_nodes:
        return torch.ones(weight.shape[0], dtype=torch.float64)
    group_loads = weight.double().view(weight.shape[0], num_groups, -1).sum(2).tolist()
    node_loads = torch.tensor(
        [[sum(loads[g] for g in groups) for groups in greedy_pack(loads, num_nodes)] for loads in group_loads]
    )
    return node_loads.max(1).values / node_loads.mean(1)


def benchmark(ctx) -> None:
    from dsinfra.eplb import gpu_loads, imbalance, rebalance_experts
    from dsinfra.testing import skewed_loads

    num_layers = 8 if ctx.quick else NUM_LAYERS
    weight = skewed_loads(num_layers, NUM_EXPERTS, seed=0).to(ctx.device)  # both planners copy it to the CPU
    for num_replicas, num_nodes, num_gpus in CASES[::2] if ctx.quick else CASES:
        args = (num_replicas, NUM_GROUPS, num_nodes, num_gpus)
        policy = "hierarchical" if NUM_GROUPS % num_nodes == 0 else "global"
        ours = gpu_loads(weight, rebalance_experts(weight, *args)[0], num_gpus)
        theirs = gpu_loads(weight, greedy_rebalance_experts(weight, *args)[0], num_gpus)
        ours_max, theirs_max = ours.max(1).values, theirs.max(1).values
        ctx.measure(
            f"{policy}: {num_replicas} replicas, {num_nodes}x{num_gpus // num_nodes} GPUs",
            lambda: rebalance_experts(weight, *args),
            baseline=lambda: greedy_rebalance_experts(weight, *args),
            baseline_name="DeepSeek greedy",
            baseline_repeats=min(3, ctx.repeats),
            params={"layers": num_layers, "experts": NUM_EXPERTS, "groups": NUM_GROUPS, "replicas": num_replicas,
                    "nodes": num_nodes, "gpus": num_gpus, "policy": policy},
            extra={  # imbalances as text: three significant figures would hide the differences near 1
                "floor": f"{imbalance_floor(weight, NUM_GROUPS, num_nodes).mean():.4f}",
                "imbalance": f"{imbalance(ours).mean():.4f}",
                "baseline imbalance": f"{imbalance(theirs).mean():.4f}",
                "worst": f"{imbalance(ours).max():.4f}",
                "baseline worst": f"{imbalance(theirs).max():.4f}",
                "layers no worse": f"{int((ours_max <= theirs_max * (1 + 1e-12)).sum())}/{num_layers}",
                "layers better": f"{int((ours_max < theirs_max * (1 - 1e-12)).sum())}/{num_layers}",
            },
        )
