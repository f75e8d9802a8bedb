"""DeepSeek's plan, exactly: the phy2log, log2phy and logcnt that EPLB's
``eplb.py`` returns, for users who need the same plan bit for bit
(``rebalance_experts(..., plan="deepseek")``).

The steps are those of :mod:`dsinfra.eplb.planner`, run DeepSeek's way:

- loads become float32, and every sum and division is done in float32;
- packing (groups onto nodes, replicas onto GPUs) is greedy, items in the order
  of ``torch.sort(descending=True)``; when there are as many items as packs,
  item ``i`` goes to pack ``i``;
- replicas are numbered as DeepSeek numbers them: within a node, first one
  replica of each expert in order, then the extra replicas in the order the
  replication rule hands them out; an expert's ``k``-th replica (``k = 0`` for
  its first) fills ``log2phy[layer, expert, k]``.

Two releases differ when ``num_nodes`` does not divide ``num_groups`` (the
global policy): since 2025-03-21 (commit e1100fe, ``plan="deepseek"``) the
replicas are packed onto GPUs as in one node of one group; before
(2025-02-26 to 2025-02-27, commits f9bc62e to 3079d71, ``plan="deepseek-2025-02"``)
every expert's first replica sits in slot ``expert`` and the extra replicas
follow in the order handed out, with no packing.
"""

from __future__ import annotations

import numpy as np
import torch

from dsinfra.eplb import packing, replication

# plan name -> whether the global policy packs replicas onto GPUs
RELEASES = {"deepseek": True, "deepseek-2025-02": False}


def deepseek_plan(
    weight: torch.Tensor, num_replicas: int, num_groups: int, num_nodes: int, num_gpus: int, plan: str = "deepseek"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``rebalance_experts``' results as DeepSeek's ``eplb.py`` of release
    ``plan`` (a key of :data:`RELEASES`) computes them. Arguments already
    checked; ``weight``: [num_layers, num_logical_experts], any real dtype."""
    loads = weight.detach().float().cpu()
    if not (torch.isfinite(loads).all() and torch.isfinite(loads.sum(1)).all()):
        raise ValueError(f'weight holds loads too large for float32, in which plan="{plan}" computes; scale them down')
    num_layers, num_experts = loads.shape
    if num_groups % num_nodes == 0:
        phy2log, ranks, logcnt = _hierarchical(loads, num_replicas, num_groups, num_nodes, num_gpus)
    elif RELEASES[plan]:
        phy2log, ranks, logcnt = _hierarchical(loads, num_replicas, 1, 1, num_gpus)
    else:
        phy2log, ranks, logcnt = _replicate(loads.numpy(), num_replicas)
    log2phy = np.full((num_layers, num_experts, logcnt.max()), -1, dtype=np.int64)
    log2phy[np.arange(num_layers)[:, None], phy2log, ranks] = np.arange(num_replicas)
    return torch.from_numpy(phy2log), torch.from_numpy(log2phy), torch.from_numpy(logcnt)


def _hierarchical(
    loads: torch.Tensor, num_replicas: int, num_groups: int, num_nodes: int, num_gpus: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(phy2log, replica rank of every slot, logcnt) of the hierarchical policy."""
    num_layers, num_experts = loads.shape
    group_size = num_experts // num_groups
    experts_per_node = num_experts // num_nodes
    group_loads = loads.unflatten(-1, (num_groups, group_size)).sum(-1)
    node_groups = _pack(group_loads, num_nodes)  # [layers, groups]: the groups of node 0, then node 1, ...
    # node_experts[layer, j]: the logical expert in place j (experts_per_node places per node).
    node_experts = (node_groups[..., None] * group_size + np.arange(group_size)).reshape(num_layers, num_experts)
    node_loads = np.take_along_axis(loads.numpy(), node_experts, 1).reshape(num_layers * num_nodes, experts_per_node)

    replicas, ranks, counts = _replicate(node_loads, num_replicas // num_nodes)
    replica_loads = np.take_along_axis(node_loads / counts.astype(np.float32), replicas, 1)
    slots = _pack(torch.from_numpy(replica_loads), num_gpus // num_nodes)  # replica in every slot of a node

    places = np.take_along_axis(replicas, slots, 1).reshape(num_layers, num_nodes, -1)
    places = places + (np.arange(num_nodes) * experts_per_node)[:, None]
    phy2log = np.take_along_axis(node_experts, places.reshape(num_layers, num_replicas), 1)
    ranks = np.take_along_axis(ranks, slots, 1).reshape(num_layers, num_replicas)
    logcnt = np.empty((num_layers, num_experts), dtype=np.int64)
    np.put_along_axis(logcnt, node_experts, counts.reshape(num_layers, num_experts), 1)
    return phy2log, ranks, logcnt


def _replicate(loads: np.ndarray, num_replicas: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """DeepSeek's replication of every row: (the expert of every replica, its
    rank among its expert's replicas, replica counts), replicas numbered one of
    each expert first, then the extra ones in the order handed out.

    loads: [rows, num_experts], float32. Returns three int64 arrays,
    [rows, num_replicas], [rows, num_replicas] and [rows, num_experts].
    """
    rows, num_experts = loads.shape
    order = replication.greedy_order(loads, num_replicas)
    experts = np.concatenate([np.broadcast_to(np.arange(num_experts), (rows, num_experts)), order], 1)
    # The rank of each replica: how many replicas of its expert come before it.
    seen = (experts[:, :, None] == np.arange(num_experts)).cumsum(1)
    ranks = np.take_along_axis(seen, experts[:, :, None], 2)[..., 0] - 1
    return experts, ranks, replication.counts_after(order, num_experts, order.shape[1])


def _pack(weights: torch.Tensor, num_packs: int) -> np.ndarray:
    """DeepSeek's packing of every row: the item in every slot, packs in
    order, [rows, num_items], int64. weights: [rows, num_items], float32."""
    rows, num_items = weights.shape
    if num_items == num_packs:
        return np.broadcast_to(np.arange(num_items), (rows, num_items)).copy()
    order = weights.sort(-1, descending=True).indices.numpy()
    return packing.greedy_pack(weights.numpy(), num_packs, order).reshape(rows, num_items)
