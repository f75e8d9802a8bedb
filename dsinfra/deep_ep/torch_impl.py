"""The dispatch layout in vectorised PyTorch (the CPU path): scatters, no loops,
no host synchronisation."""

from __future__ import annotations

import torch


def get_dispatch_layout(
    topk_idx: torch.Tensor, num_experts: int, num_ranks: int, num_nodes: int
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """See :func:`dsinfra.deep_ep.reference.get_dispatch_layout`."""
    num_tokens = topk_idx.shape[0]
    valid = topk_idx >= 0
    # -1 entries land in a spill column that is cut off afterwards.
    expert = topk_idx.masked_fill(~valid, num_experts).flatten()
    per_expert = torch.zeros(num_experts + 1, dtype=torch.int32, device=topk_idx.device)
    per_expert.scatter_add_(0, expert, torch.ones_like(expert, dtype=torch.int32))
    rank = torch.where(valid, topk_idx // (num_experts // num_ranks), num_ranks)
    is_token_in_rank = torch.zeros(num_tokens, num_ranks + 1, dtype=torch.bool, device=topk_idx.device)
    is_token_in_rank.scatter_(1, rank, True)
    is_token_in_rank = is_token_in_rank[:, :num_ranks].contiguous()
    per_rank = is_token_in_rank.sum(dim=0, dtype=torch.int32)
    per_node = None
    if num_nodes > 1:
        per_node = is_token_in_rank.view(num_tokens, num_nodes, num_ranks // num_nodes).any(dim=2).sum(dim=0, dtype=torch.int32)
    return per_rank, per_node, per_expert[:num_experts], is_token_in_rank
