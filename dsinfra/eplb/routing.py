"""Applying a plan to routing decisions: from the logical experts a router
chose to the physical slots (replicas) that serve them."""

from __future__ import annotations

import torch

from dsinfra.validation import check_range, check_tensor

# The dtypes routers give their top-k expert ids in.
TOPK_DTYPES = (torch.int32, torch.int64)


def route_to_replicas(
    topk_idx: torch.Tensor, log2phy: torch.Tensor, logcnt: torch.Tensor, offset: int = 0
) -> torch.Tensor:
    """The physical slot that serves every routing decision of one layer,
    spreading each expert's tokens evenly over its replicas.

    The entries of ``topk_idx`` are taken in order (row-major); the ``j``-th one
    naming expert ``e`` goes to replica ``(j + offset) % logcnt[e]`` of ``e``, so
    the replicas of an expert receive its tokens in shares that differ by at
    most one. Replicas carry equal shares of their expert's load in the plan,
    so this sends every token to a least-loaded replica. Pass a different
    ``offset`` per rank (or per step) so that small batches do not all start at
    replica 0.

    topk_idx: [num_tokens, num_topk] (any shape), int32 or int64: logical expert
        ids, -1 for none.
    log2phy: [num_logical_experts, max_replicas], int64, and logcnt:
        [num_logical_experts], int64: one layer of ``rebalance_experts``'s results,
        on ``topk_idx``'s device.
    Returns the slots: int64, ``topk_idx``'s shape, -1 where ``topk_idx`` is -1.
    Slot ``s`` lives on GPU ``s // (num_replicas // num_gpus)``.
    """
    check_tensor("topk_idx", topk_idx, dtype=TOPK_DTYPES)
    check_tensor("log2phy", log2phy, dtype=torch.int64, ndim=2, device=topk_idx.device)
    num_experts = log2phy.shape[0]
    check_tensor("logcnt", logcnt, dtype=torch.int64, shape=(num_experts,), device=topk_idx.device)
    if isinstance(offset, bool) or not isinstance(offset, int):
        raise TypeError(f"offset must be an int; got {type(offset).__name__}")
    check_range("topk_idx", topk_idx, 0, num_experts, ignore=-1)
    check_range("logcnt", logcnt, 1, log2phy.shape[1] + 1)

    experts = topk_idx.reshape(-1).to(torch.int64)
    valid = experts >= 0
    experts = torch.where(valid, experts, num_experts)  # the -1 entries sort last, under an extra id
    order = torch.sort(experts, stable=True).indices  # entries grouped by expert, each group in row-major order
    per_expert = torch.zeros(num_experts + 1, dtype=torch.int64, device=experts.device)
    per_expert.index_add_(0, experts, torch.ones_like(experts))
    first = per_expert.cumsum(0) - per_expert  # where each expert's group starts in `order`
    occurrence = torch.empty_like(experts)
    occurrence[order] = torch.arange(experts.numel(), device=experts.device) - first[experts[order]]
    experts = experts.clamp(max=num_experts - 1)
    replica = (occurrence + offset) % logcnt[experts]
    slots = log2phy[experts, replica]
    return torch.where(valid, slots, -1).view(topk_idx.shape)
