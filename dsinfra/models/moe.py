"""DeepSeek-V3's mixture of experts: a shared expert plus routed experts chosen
by group-limited top-k routing, balanced without an auxiliary loss."""

from __future__ import annotations

import torch
from torch import nn

from dsinfra.models.config import ModelArgs
from dsinfra.models.layers import MLP, LinearFactory, plain_linear


class Gate(nn.Module):
    """Routes each token to ``n_activated_experts`` of the routed experts.

    Scores are sigmoids of the token's affinity to each expert. A per-expert
    ``bias`` (not trained by gradients) is added to the scores only to *choose*
    experts: experts are picked from the ``n_limited_groups`` groups with the
    highest sum of their two best biased scores, then the top-k biased scores
    among those groups. The weights come from the unbiased scores, normalised
    to sum to ``route_scale``. :meth:`update_bias` nudges the bias of
    overloaded experts down and of underloaded ones up: DeepSeek-V3's
    auxiliary-loss-free load balancing.
    """

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.weight = nn.Parameter(torch.empty(args.n_routed_experts, args.dim))
        nn.init.normal_(self.weight, std=args.dim**-0.5)
        self.register_buffer("bias", torch.zeros(args.n_routed_experts))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: [num_tokens, dim] -> (weights [num_tokens, topk] in x's dtype, indices [num_tokens, topk] int64)."""
        a = self.args
        scores = torch.sigmoid(x.float() @ self.weight.float().t())
        biased = (scores + self.bias).unflatten(-1, (a.n_expert_groups, -1))
        group_scores = biased.topk(min(2, biased.shape[-1]), dim=-1).values.sum(-1)
        groups = group_scores.topk(a.n_limited_groups, dim=-1).indices
        allowed = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, groups, True)
        biased = biased.masked_fill(~allowed.unsqueeze(-1), float("-inf")).flatten(1)
        indices = biased.topk(a.n_activated_experts, dim=-1).indices
        weights = scores.gather(1, indices)
        weights = weights / weights.sum(-1, keepdim=True) * a.route_scale
        return weights.to(x.dtype), indices

    @torch.no_grad()
    def update_bias(self, tokens_per_expert: torch.Tensor) -> None:
        """One balancing step from the loads seen since the last one (identical
        on every rank that holds this gate, when the loads were all-reduced)."""
        loads = tokens_per_expert.float()
        self.bias += self.args.bias_update_speed * torch.sign(loads.mean() - loads)


class Experts(nn.Module):
    """A set of routed experts: all of them, or one expert-parallel rank's
    share. ``forward`` adds up, for each token, its weighted outputs from the
    experts of this set it was routed to."""

    def __init__(self, num_experts: int, dim: int, inter_dim: int, linear: LinearFactory = plain_linear):
        super().__init__()
        self.experts = nn.ModuleList(MLP(dim, inter_dim, linear) for _ in range(num_experts))

    def forward(self, x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
        """x: [num_tokens, dim]; topk_idx: [num_tokens, topk] int64 ids into this
        set, -1 for experts elsewhere; topk_weights: [num_tokens, topk]."""
        out = torch.zeros_like(x)
        token, slot = torch.nonzero(topk_idx >= 0, as_tuple=True)
        expert = topk_idx[token, slot]
        order = torch.argsort(expert, stable=True)
        token, slot, expert = token[order], slot[order], expert[order]
        counts = torch.bincount(expert, minlength=len(self.experts)).tolist()
        start = 0
        for e, count in enumerate(counts):
            if count:
                rows = token[start : start + count]
                weight = topk_weights[rows, slot[start : start + count]].unsqueeze(1).to(x.dtype)
                out = out.index_add(0, rows, self.experts[e](x[rows]) * weight)
            start += count
        return out


class MoE(nn.Module):
    """Shared expert + routed experts of block ``layer``. With ``dispatcher``
    unset every routed expert lives here; an expert-parallel dispatcher (see
    :mod:`dsinfra.models.parallel`) sends tokens to the ranks holding their
    experts and brings the results back. ``tokens_per_expert`` counts the
    routing decisions since the last :meth:`Gate.update_bias`."""

    def __init__(self, args: ModelArgs, layer: int, linear: LinearFactory = plain_linear):
        super().__init__()
        self.args = args
        self.layer = layer
        self.gate = Gate(args)
        self.experts = Experts(args.n_routed_experts, args.dim, args.moe_inter_dim, linear)
        self.shared = MLP(args.dim, args.n_shared_experts * args.moe_inter_dim) if args.n_shared_experts else None
        self.dispatcher = None
        self.recorder = None  # an eplb.ExpertLoadRecorder over the model's MoE layers, if set
        # tokens routed to each expert since the last balancing step
        self.register_buffer("tokens_per_expert", torch.zeros(args.n_routed_experts), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.flatten(0, -2)
        weights, indices = self.gate(flat)
        with torch.no_grad():
            self.tokens_per_expert += torch.bincount(indices.flatten(), minlength=self.args.n_routed_experts)
        if self.recorder is not None:
            self.recorder.record(self.layer - self.args.n_dense_layers, indices)
        if self.dispatcher is None:
            routed = self.experts(flat, indices, weights)
        else:
            routed = self.dispatcher(self.experts, flat, indices, weights)
        if self.shared is not None:
            routed = routed + self.shared(flat)
        return routed.view_as(x)
