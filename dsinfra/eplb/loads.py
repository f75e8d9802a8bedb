"""What a placement does to the GPUs' loads, and how even that is."""

from __future__ import annotations

import torch

from dsinfra.validation import check_divisible, check_positive, check_range, check_tensor


def slot_loads(weight: torch.Tensor, phy2log: torch.Tensor) -> torch.Tensor:
    """The load every slot carries under a placement: its expert's load divided
    by the expert's replica count.

    weight: [num_layers, num_logical_experts], any real or integer dtype;
    phy2log: [num_layers, num_replicas], int64, as ``rebalance_experts`` returns it.
    Returns [num_layers, num_replicas], float64, on ``phy2log``'s device.
    """
    check_tensor("weight", weight, ndim=2)
    check_tensor("phy2log", phy2log, dtype=torch.int64, shape=(weight.shape[0], None))
    check_range("phy2log", phy2log, 0, weight.shape[1])
    weight = weight.to(device=phy2log.device, dtype=torch.float64)
    counts = torch.zeros_like(weight).scatter_add_(1, phy2log, torch.ones_like(phy2log, dtype=torch.float64))
    return weight.gather(1, phy2log) / counts.gather(1, phy2log)


def gpu_loads(weight: torch.Tensor, phy2log: torch.Tensor, num_gpus: int) -> torch.Tensor:
    """The load of every GPU under a placement: [num_layers, num_gpus], float64
    (see :func:`slot_loads`). num_gpus must divide the slots per layer."""
    slots = slot_loads(weight, phy2log)
    check_positive("num_gpus", num_gpus)
    check_divisible("the slots per layer of phy2log", slots.shape[1], num_gpus, "num_gpus")
    return slots.view(slots.shape[0], num_gpus, -1).sum(2)


def in_order_gpu_loads(weight: torch.Tensor, num_gpus: int) -> torch.Tensor:
    """GPU loads without a balancer: no replicas, experts in order, expert ``e``
    on GPU ``e * num_gpus // num_logical_experts`` (consecutive experts share a GPU).

    weight: [num_layers, num_logical_experts]. Returns [num_layers, num_gpus], float64.
    """
    check_tensor("weight", weight, ndim=2)
    check_positive("num_gpus", num_gpus)
    num_experts = weight.shape[1]
    gpu = torch.arange(num_experts, device=weight.device) * num_gpus // num_experts
    loads = torch.zeros(weight.shape[0], num_gpus, dtype=torch.float64, device=weight.device)
    return loads.index_add_(1, gpu, weight.to(torch.float64))


def imbalance(loads: torch.Tensor) -> torch.Tensor:
    """Max GPU load / mean GPU load of every layer (1 for a layer without load).

    loads: [num_layers, num_gpus]. Returns [num_layers], float64.
    """
    loads = loads.to(torch.float64)
    mean = loads.mean(1)
    return torch.where(mean > 0, loads.max(1).values / mean.clamp_min(torch.finfo(torch.float64).tiny), 1.0)
