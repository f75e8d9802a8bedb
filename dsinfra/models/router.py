"""The MoE router of a loaded checkpoint (``mlp.gate``): DeepSeek-V2's softmax
routing, greedy or group-limited, and V3's sigmoid routing with score-correction
biases (``noaux_tc``), as :class:`~dsinfra.models.checkpoint_config.CheckpointConfig`
describes them."""

from __future__ import annotations

import torch
from torch import nn

from dsinfra.models.checkpoint_config import CheckpointConfig


class Router(nn.Module):
    """weight: [n_routed_experts, hidden] (float32 in the checkpoints);
    e_score_correction_bias: [n_routed_experts] float32, with ``noaux_tc`` only.
    Scores are computed in float32 whatever the model's dtype."""

    def __init__(self, config: CheckpointConfig, weight: torch.Tensor, e_score_correction_bias: torch.Tensor | None = None):
        super().__init__()
        self.config = config
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.e_score_correction_bias = (
            None if e_score_correction_bias is None else nn.Parameter(e_score_correction_bias, requires_grad=False)
        )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: [num_tokens, hidden] -> (weights [num_tokens, top-k] float32, experts [num_tokens, top-k] int64)."""
        c = self.config
        logits = x.float() @ self.weight.float().T
        scores = logits.softmax(dim=-1) if c.scoring_func == "softmax" else logits.sigmoid()
        choice = scores if self.e_score_correction_bias is None else scores + self.e_score_correction_bias.float()
        if c.topk_method != "greedy":
            groups = choice.unflatten(-1, (c.n_group, -1))
            if c.topk_method == "noaux_tc":
                group_scores = groups.topk(min(2, groups.shape[-1]), dim=-1).values.sum(-1)
            else:
                group_scores = groups.amax(dim=-1)
            kept = group_scores.topk(c.topk_group, dim=-1).indices
            dropped = torch.ones_like(group_scores, dtype=torch.bool).scatter_(1, kept, False)
            choice = groups.masked_fill(dropped.unsqueeze(-1), float("-inf")).flatten(1)
        experts = choice.topk(c.num_experts_per_tok, dim=-1).indices
        weights = scores.gather(1, experts)
        if c.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return weights * c.routed_scaling_factor, experts
