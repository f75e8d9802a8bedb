"""Expert parallelism for the model's MoE layers, through :mod:`dsinfra.deep_ep`.

Each rank of an expert-parallel group holds an equal, contiguous share of the
routed experts (or of the physical slots of an EPLB plan). A MoE layer's
``dispatcher`` sends every token to the ranks holding its experts, runs the
local experts there, and brings the weighted results back:

- :class:`ExpertParallel` for training and prefill (normal mode, differentiable);
- :class:`LowLatencyExperts` for decoding (low-latency mode: FP8 on the way
  out, static shapes, weights applied in the combine), optionally routing each
  token to the least-loaded replica of an EPLB plan.
"""

from __future__ import annotations

import torch
from torch import nn

from dsinfra.models.moe import Experts, MoE


def expert_range(num_experts: int, rank: int, num_ranks: int) -> range:
    """The experts (or slots) rank ``rank`` of ``num_ranks`` holds."""
    if num_experts % num_ranks:
        raise ValueError(f"the number of experts ({num_experts}) must be divisible by the expert-parallel ranks ({num_ranks})")
    per_rank = num_experts // num_ranks
    return range(rank * per_rank, (rank + 1) * per_rank)


def keep_local_experts(moe: MoE, rank: int, num_ranks: int) -> range:
    """Drop the routed experts other ranks hold; returns the ids kept."""
    kept = expert_range(len(moe.experts.experts), rank, num_ranks)
    moe.experts.experts = nn.ModuleList(moe.experts.experts[i] for i in kept)
    return kept


class ExpertParallel:
    """A differentiable dispatcher over an expert-parallel group.

    ``buffer`` carries the forward's dispatch and combine; ``backward_buffer``
    (a Buffer over the same ranks on another group; default ``buffer``) their
    backward passes, so a backward may run on another thread during a forward
    (see :meth:`dsinfra.models.stages.Stage.overlapped_forward_backward`).
    """

    def __init__(self, buffer, num_experts: int, backward_buffer=None):
        self.buffer = buffer
        self.backward_buffer = backward_buffer or buffer
        self.num_experts = num_experts

    def __call__(self, experts: Experts, x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
        from dsinfra.deep_ep import autograd as ep

        recv_x, recv_idx, recv_weights, _, handle = ep.dispatch(
            self.buffer, x, topk_idx, topk_weights.float(), self.num_experts, backward_buffer=self.backward_buffer
        )
        y = experts(recv_x, recv_idx, recv_weights)
        return ep.combine(self.buffer, y, handle, backward_buffer=self.backward_buffer)


class LowLatencyExperts:
    """A decoding dispatcher: low-latency dispatch (FP8) and combine (weights
    applied there) over slots ``expert_range(num_slots, rank, num_ranks)``.

    With ``placement = (log2phy, logcnt)`` (one layer of an EPLB plan) the
    router's logical experts are mapped to physical slots, each token to a
    least-loaded replica. ``loads`` counts, for each rank of the group, the
    (token, expert) pairs this rank's tokens sent it, and ``loads_in_order``
    what they would have sent it with the logical experts placed in order and
    not replicated: [num_ranks] int64 each; sum them over the group for every
    rank's load.
    """

    def __init__(self, buffer, num_slots: int, max_tokens: int, placement: tuple[torch.Tensor, torch.Tensor] | None = None):
        self.buffer = buffer
        self.num_slots = num_slots
        self.max_tokens = max_tokens
        self.placement = placement
        self.loads = torch.zeros(buffer.group_size, dtype=torch.int64)
        self.loads_in_order = torch.zeros(buffer.group_size, dtype=torch.int64)

    def __call__(self, experts: Experts, x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
        from dsinfra.eplb import route_to_replicas
        from dsinfra.fp8 import per_token_cast_back

        ranks = self.buffer.group_size
        num_logical = self.num_slots if self.placement is None else self.placement[0].shape[0]
        self.loads_in_order += _pairs_per_rank(topk_idx, num_logical, ranks)
        if self.placement is not None:
            log2phy, logcnt = self.placement
            topk_idx = route_to_replicas(topk_idx, log2phy, logcnt, offset=self.buffer.rank)
        self.loads += _pairs_per_rank(topk_idx, self.num_slots, ranks)
        (recv_fp8, recv_scales), recv_count, handle, _, _ = self.buffer.low_latency_dispatch(
            x.to(torch.bfloat16), topk_idx, self.max_tokens, self.num_slots
        )
        y = torch.zeros(recv_fp8.shape, dtype=torch.bfloat16, device=x.device)
        for e, count in enumerate(recv_count.tolist()):
            if count:
                rows = per_token_cast_back(recv_fp8[e, :count], recv_scales[e, :count].contiguous(), x.dtype)
                y[e, :count] = experts.experts[e](rows).to(torch.bfloat16)
        combined, _, _ = self.buffer.low_latency_combine(y, topk_idx, topk_weights.float(), handle)
        return combined.to(x.dtype)


def _pairs_per_rank(topk_idx: torch.Tensor, num_experts: int, num_ranks: int) -> torch.Tensor:
    """(token, expert) pairs going to each rank when experts are split evenly in order."""
    chosen = topk_idx[topk_idx >= 0]
    return torch.bincount(chosen // (num_experts // num_ranks), minlength=num_ranks).cpu()
