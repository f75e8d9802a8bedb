"""``rebalance_experts``: where each expert's replicas go, all layers at once.

The steps are DeepSeek's (EPLB's hierarchical policy; the global policy is the
same with one group on one node):

1. pack the expert groups onto the nodes, balancing the nodes' loads;
2. within each node, decide each expert's replica count;
3. within each node, pack the replicas onto its GPUs.

The planner first makes DeepSeek's plan: greedy packing in steps 1 and 3,
DeepSeek's replication rule in step 2, every layer and node at once. Then, in
each node whose heaviest GPU is above the floor (the least its layer's
heaviest GPU can carry: the layer's heaviest node's mean GPU load), it tries
stopping the replication rule early (:mod:`dsinfra.eplb.replication`) under a
quick packing, keeps the best stop where its heaviest GPU is no heavier than
DeepSeek's, and swaps replicas between the heaviest GPU and lighter ones while
that lowers it (:mod:`dsinfra.eplb.packing`). No step ever makes a node's
heaviest GPU heavier than in DeepSeek's plan, so no layer's is.
"""

from __future__ import annotations

import os

import numpy as np
import torch

from dsinfra.eplb import deepseek_plan, packing, replication
from dsinfra.validation import check_divisible, check_positive, check_tensor


def rebalance_experts(
    weight: torch.Tensor, num_replicas: int, num_groups: int, num_nodes: int, num_gpus: int, *, plan: str | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Entry point of the expert-parallel load balancer (DeepSeek EPLB's API).

    weight: [num_layers, num_logical_experts], any real or integer dtype, any
        device: the load of every logical expert (e.g. tokens routed to it).
    num_replicas: physical experts (slots) per layer, a multiple of ``num_gpus``
        and at least ``num_logical_experts``.
    num_groups: expert groups; must divide ``num_logical_experts``.
    num_nodes: server nodes (fast links inside a node); must divide ``num_gpus``.
    num_gpus: GPUs, ``num_gpus // num_nodes`` per node.

    plan: which plan to make (default: the ``DSINFRA_EPLB_PLAN`` environment
        variable, else ``"balanced"``). ``"balanced"``: dsinfra's, whose
        heaviest GPU is never heavier than in DeepSeek's plan and often
        lighter. ``"deepseek"``: DeepSeek's plan exactly, as its ``eplb.py``
        computes it since 2025-03-21; ``"deepseek-2025-02"``: as its first
        release did (they differ under the global policy only). See
        :mod:`dsinfra.eplb.deepseek_plan`.

    When ``num_nodes`` divides ``num_groups`` the hierarchical policy keeps every
    group on one node and replicates within nodes; otherwise the global policy
    replicates and places across all GPUs.

    Returns, on the CPU:
        phy2log: [num_layers, num_replicas], int64: the logical expert of every
            slot; ``num_replicas // num_gpus`` slots per GPU in GPU order, GPUs in node order.
        log2phy: [num_layers, num_logical_experts, max_replicas], int64: the slots
            of every logical expert in ascending order, padded with -1.
        logcnt: [num_layers, num_logical_experts], int64: replica counts, each >= 1.
        (DeepSeek's plans order each expert's slots in log2phy as its ``eplb.py``
        does: first replica first.)
    """
    plan = _chosen_plan(plan)
    loads = _checked_loads(weight, num_replicas, num_groups, num_nodes, num_gpus)
    if plan != "balanced":
        return deepseek_plan.deepseek_plan(weight, num_replicas, num_groups, num_nodes, num_gpus, plan)
    if num_groups % num_nodes:  # the global policy: one group on one node
        num_groups = num_nodes = 1
    group_loads = loads.view(loads.shape[0], num_groups, -1).sum(2)
    phy2log = torch.from_numpy(place(loads.numpy(), group_loads.numpy(), num_replicas, num_nodes, num_gpus))
    log2phy, logcnt = logical_to_physical_map(phy2log, loads.shape[1])
    return phy2log, log2phy, logcnt


PLANS = ("balanced", *deepseek_plan.RELEASES)


def _chosen_plan(plan: str | None) -> str:
    if plan is None:
        plan = os.environ.get("DSINFRA_EPLB_PLAN", "balanced")
        if plan not in PLANS:
            raise ValueError(f"DSINFRA_EPLB_PLAN must be one of {', '.join(PLANS)}; got {plan!r}")
    elif plan not in PLANS:
        raise ValueError(f"plan must be one of {', '.join(PLANS)}; got {plan!r}")
    return plan


def _checked_loads(weight, num_replicas: int, num_groups: int, num_nodes: int, num_gpus: int) -> torch.Tensor:
    """``weight`` as float64 on the CPU, after checking every argument."""
    check_tensor("weight", weight, ndim=2)
    if weight.dtype == torch.bool or weight.is_complex():
        raise TypeError(f"weight must have a real or integer dtype; got {str(weight.dtype).replace('torch.', '')}")
    for name, value in zip(("num_replicas", "num_groups", "num_nodes", "num_gpus"), (num_replicas, num_groups, num_nodes, num_gpus)):
        check_positive(name, value)
    num_layers, num_experts = weight.shape
    if num_layers == 0 or num_experts == 0:
        raise ValueError(f"weight must have at least one layer and one expert; got shape {list(weight.shape)}")
    check_divisible("num_logical_experts", num_experts, num_groups, "num_groups")
    check_divisible("num_gpus", num_gpus, num_nodes, "num_nodes")
    check_divisible("num_replicas", num_replicas, num_gpus, "num_gpus")
    if num_replicas < num_experts:
        raise ValueError(f"num_replicas ({num_replicas}) must be >= num_logical_experts ({num_experts})")
    loads = weight.detach().to(device="cpu", dtype=torch.float64)
    bad = ~(torch.isfinite(loads) & (loads >= 0))
    if bad.any():
        raise ValueError(f"weight must hold finite loads >= 0; found {loads[bad][0].item()}")
    if not torch.isfinite(loads.sum(1)).all():
        raise ValueError("weight holds loads too large to add up in float64; scale them down")
    return loads.contiguous()


def place(loads: np.ndarray, group_loads: np.ndarray, num_replicas: int, num_nodes: int, num_gpus: int) -> np.ndarray:
    """The placement of every layer: which logical expert every slot holds.

    loads: [num_layers, num_experts], float64; group_loads: [num_layers,
    num_groups], float64, the sum of each group's consecutive experts (one group
    for the global policy). Returns phy2log: [num_layers, num_replicas], int64.
    """
    num_layers, num_experts = loads.shape
    num_groups = group_loads.shape[1]
    group_size = num_experts // num_groups
    node_groups = packing.greedy_pack(group_loads, num_nodes)  # [layers, nodes, groups per node]
    # Each node's experts: its groups in placement order, each group's experts in order.
    node_experts = (node_groups[..., None] * group_size + np.arange(group_size)).reshape(num_layers * num_nodes, -1)
    node_loads = np.take_along_axis(loads, node_experts.reshape(num_layers, -1), 1).reshape(node_experts.shape)
    gpus_per_node = num_gpus // num_nodes
    # No GPU of a layer can carry less than its heaviest node's mean GPU load.
    floor = (node_loads.sum(1) / gpus_per_node).reshape(num_layers, num_nodes).max(1).repeat(num_nodes)
    counts, slots = replicate_and_pack(node_loads, num_replicas // num_nodes, gpus_per_node, floor)
    slot_replicas = slots.reshape(slots.shape[0], -1)
    slot_experts = np.take_along_axis(replication.replica_experts(counts), slot_replicas, 1)
    return np.take_along_axis(node_experts, slot_experts, 1).reshape(num_layers, num_replicas)


def replicate_and_pack(
    loads: np.ndarray, num_slots: int, num_gpus: int, floor: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Replicas for every row's experts and their packing onto the row's GPUs
    (a row is a node of a layer), never with a heavier GPU than DeepSeek's plan.

    Starts from DeepSeek's plan. Rows whose heaviest GPU is already down to
    ``floor``, the least its layer's heaviest GPU can carry, keep it: improving
    them would not lower their layer's maximum (rows without load are improved
    all the same, so that their extra replicas spread over the experts). In the
    other rows the stopping points of the replication rule compete, and then
    replicas are swapped between GPUs.

    loads: [rows, num_experts], float64; floor: [rows], float64. Returns counts:
    [rows, num_experts], int64, and slots: [rows, num_gpus, num_slots // num_gpus],
    int64, the replica (numbered as in :func:`replication.replica_loads`) in every slot.
    """
    num_experts = loads.shape[1]
    order = replication.greedy_order(loads, num_slots)
    counts = replication.counts_after(order, num_experts, num_slots - num_experts)
    items = replication.replica_loads(loads, counts)
    slots = packing.greedy_pack(items, num_gpus)
    heaviest = packing.pack_loads(items, slots).max(1)
    rows = np.flatnonzero((heaviest > floor) | (heaviest == 0))
    if rows.size:
        counts[rows], slots[rows] = _best_candidates(loads[rows], order[rows], counts[rows], slots[rows], heaviest[rows])
        slots[rows] = packing.improve_packing(replication.replica_loads(loads[rows], counts[rows]), slots[rows], floor[rows])
    return counts, slots


def _best_candidates(
    loads: np.ndarray, order: np.ndarray, counts: np.ndarray, slots: np.ndarray, heaviest: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Each row's best stopping point of the replication rule (see
    :mod:`dsinfra.eplb.replication`) under a quick packing, where its heaviest
    GPU is no heavier than ``heaviest``, DeepSeek's (``counts``, ``slots``)."""
    rows, num_experts = loads.shape
    num_gpus = slots.shape[1]
    stops = replication.stopping_points(order.shape[1])
    candidates = replication.candidate_counts(loads, order, stops)  # [stops, rows, experts]
    tiled_loads = np.broadcast_to(loads, candidates.shape).reshape(-1, num_experts)
    items = replication.replica_loads(tiled_loads, candidates.reshape(-1, num_experts))
    candidate_slots = packing.round_pack(items, num_gpus)
    candidate_max = packing.pack_loads(items, candidate_slots).max(1).reshape(len(stops), rows)
    best = candidate_max.argmin(0)  # equal maxima: the earliest stop, which spreads replicas most
    row = np.arange(rows)
    take = candidate_max[best, row] <= heaviest
    counts = np.where(take[:, None], candidates[best, row], counts)
    slots = np.where(take[:, None, None], candidate_slots.reshape(len(stops), rows, *slots.shape[1:])[best, row], slots)
    return counts, slots


def logical_to_physical_map(phy2log: torch.Tensor, num_logical_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """log2phy and logcnt of a placement.

    phy2log: [num_layers, num_replicas], int64. Returns, on ``phy2log``'s device,
    log2phy: [num_layers, num_logical_experts, max_replicas], int64, each expert's
    slots in ascending order padded with -1, and logcnt: [num_layers, num_logical_experts], int64.
    """
    placement = phy2log.cpu().numpy()
    num_layers, num_replicas = placement.shape
    layer = np.arange(num_layers)[:, None]
    flat = (layer * num_logical_experts + placement).ravel()
    logcnt = np.bincount(flat, minlength=num_layers * num_logical_experts).reshape(num_layers, num_logical_experts)
    slots_by_expert = np.argsort(placement, axis=1, kind="stable")
    experts = np.take_along_axis(placement, slots_by_expert, 1)
    first_slot = logcnt.cumsum(1) - logcnt  # where each expert's slots start in slots_by_expert
    rank = np.arange(num_replicas) - np.take_along_axis(first_slot, experts, 1)
    log2phy = np.full((num_layers, num_logical_experts, logcnt.max()), -1, dtype=np.int64)
    log2phy[layer, experts, rank] = slots_by_expert
    return torch.from_numpy(log2phy).to(phy2log.device), torch.from_numpy(logcnt).to(phy2log.device)
