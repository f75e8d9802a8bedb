"""Serving a loaded checkpoint with its routed experts spread over an
expert-parallel group, through deep_ep, balanced by EPLB.

Every rank holds the whole model but the routed experts: each MoE layer has
``num_slots`` slots, ``num_slots / ranks`` per rank in order, each slot one
logical expert (an EPLB plan may give an expert several slots: replicas).
Attention is data parallel: each rank serves its own prompts, and each MoE
layer sends every token to the ranks holding its experts and back
(:class:`ExpertDispatcher`): deep_ep's normal mode for prefill, its
low-latency mode (static shapes; FP8 on the way out when the experts are FP8)
for decoding bf16 models.

:func:`serve_expert_parallel` sets a model up for this with the experts in
order; :func:`rebalance` then moves them by an EPLB plan made from the routing
the recorder counted (in :func:`~dsinfra.models.generation.generate`: after
the prefill, before the first decoding step).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from dsinfra.models.grouped_experts import GroupedExperts
from dsinfra.models.parallel import expert_range


class ExpertDispatcher:
    """The routed experts of one MoE layer across ``buffer``'s group.

    ``placement``: (log2phy [experts, max replicas], logcnt [experts]) of an
    EPLB plan, or None for one slot per expert in order. ``low_latency``:
    decode through the low-latency mode (bf16 activations); otherwise both
    phases use the normal mode.
    """

    def __init__(self, buffer, num_slots: int, max_decode_tokens: int, *, low_latency: bool, use_fp8: bool):
        self.buffer = buffer
        self.num_slots = num_slots
        self.max_decode_tokens = max_decode_tokens
        self.low_latency = low_latency
        self.use_fp8 = use_fp8
        self.placement = None

    def slots(self, experts: torch.Tensor) -> torch.Tensor:
        """The slot serving each routing decision (a least-loaded replica under a plan)."""
        if self.placement is None:
            return experts
        from dsinfra.eplb import route_to_replicas

        log2phy, logcnt = self.placement
        return route_to_replicas(experts, log2phy, logcnt, offset=self.buffer.rank)

    def __call__(self, local: GroupedExperts, x: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor, decoding: bool) -> torch.Tensor:
        """x: [num_tokens, hidden]; experts, weights: [num_tokens, top-k] (the
        router's logical experts) -> the weighted sum of the experts' outputs
        [num_tokens, hidden] in x's dtype. A collective over the group."""
        slots = self.slots(experts)
        if decoding and self.low_latency:
            recv, counts, handle, _, _ = self.buffer.low_latency_dispatch(
                x.to(torch.bfloat16), slots, self.max_decode_tokens, self.num_slots, use_fp8=self.use_fp8
            )
            out, _, _ = self.buffer.low_latency_combine(local.forward_masked(recv, counts), slots, weights.float(), handle)
            return out.to(x.dtype)
        per_rank, per_node, per_slot, in_rank, _ = self.buffer.get_dispatch_layout(slots, self.num_slots)
        recv_x, recv_slots, recv_weights, _, handle, _ = self.buffer.dispatch(
            x, num_tokens_per_rank=per_rank, num_tokens_per_rdma_rank=per_node, is_token_in_rank=in_rank,
            num_tokens_per_expert=per_slot, topk_idx=slots, topk_weights=weights.float(),
        )
        out, _, _ = self.buffer.combine(local(recv_x, recv_slots, recv_weights).to(x.dtype), handle)
        return out


def in_order_placement(num_experts: int, rank: int, num_ranks: int, num_moe_layers: int) -> list[list[int]]:
    """Every MoE layer's experts of rank ``rank``, one slot each, in order."""
    return [list(expert_range(num_experts, rank, num_ranks))] * num_moe_layers


def serve_expert_parallel(
    model, group: dist.ProcessGroup, max_prefill_tokens: int, max_decode_tokens: int, max_slots: int
) -> list[ExpertDispatcher]:
    """Give ``model`` (loaded with this rank's experts in order, see
    :func:`in_order_placement`) a dispatcher in every MoE layer over ``group``.

    max_prefill_tokens, max_decode_tokens: the most tokens any rank sends in
    one prefill / decoding forward; max_slots: the most slots a plan will use
    (they size deep_ep's buffer).
    """
    from dsinfra.deep_ep import Buffer

    config = model.config
    ranks = group.size()
    hidden = config.hidden_size
    moe_layers = model.moe_layers()
    use_fp8 = bool(moe_layers) and moe_layers[0].experts.is_fp8 and hidden % 128 == 0
    low_latency = model.dtype == torch.bfloat16
    row_bytes = hidden * model.dtype.itemsize + config.num_experts_per_tok * 16 + 64
    normal_bytes = ranks * max(1, max_prefill_tokens) * row_bytes
    latency_bytes = Buffer.get_low_latency_rdma_size_hint(max(1, max_decode_tokens), hidden, ranks, max_slots)
    buffer = Buffer(group, normal_bytes, max(normal_bytes, latency_bytes), low_latency_mode=True)
    dispatchers = []
    for moe in moe_layers:
        moe.dispatcher = ExpertDispatcher(
            buffer, config.n_routed_experts, max(1, max_decode_tokens), low_latency=low_latency, use_fp8=use_fp8
        )
        dispatchers.append(moe.dispatcher)
    return dispatchers


def rebalance(model, group: dist.ProcessGroup, recorder, num_slots: int) -> torch.Tensor:
    """Move ``model``'s experts by an EPLB plan of ``num_slots`` slots per layer
    (a multiple of the group's size, at least n_routed_experts) made from the
    loads ``recorder`` counted on every rank; each rank reads its new slots'
    experts from the checkpoint. Collective. Returns the plan's phy2log."""
    from dsinfra.eplb import rebalance_experts
    from dsinfra.models.pretrained import read_experts

    config = model.config
    ranks, rank = group.size(), group.rank()
    recorder.step()
    loads = recorder.weight(group).cpu()
    phy2log, log2phy, logcnt = rebalance_experts(loads, num_slots, config.n_group, 1, ranks)
    mine = expert_range(num_slots, rank, ranks)
    placement = [[int(phy2log[layer, slot]) for slot in mine] for layer in range(phy2log.shape[0])]
    for moe, experts, layer in zip(model.moe_layers(), read_experts(model, placement), range(phy2log.shape[0])):
        moe.experts = experts
        moe.dispatcher.num_slots = num_slots
        moe.dispatcher.placement = (log2phy[layer].to(model.device), logcnt[layer].to(model.device))
    return phy2log
