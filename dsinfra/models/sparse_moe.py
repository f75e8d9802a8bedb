"""The feed-forward blocks of a loaded checkpoint, with transformers' names:
:class:`GatedMLP` (the dense layers and the shared experts) and
:class:`SparseMoE` (router, routed experts, shared experts).

A :class:`SparseMoE` runs its routed experts here (``dispatcher`` None: every
expert is held here) or across an expert-parallel group through a dispatcher
of :mod:`dsinfra.models.expert_parallel`, which maps the router's logical
experts to the slots ranks hold (``slot_map``) and reaches them through deep_ep.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dsinfra.models.grouped_experts import GroupedExperts
from dsinfra.models.linear import Linear
from dsinfra.models.router import Router


class GatedMLP(nn.Module):
    """``down_proj(silu(gate_proj x) * up_proj x)``."""

    def __init__(self, gate_proj: Linear, up_proj: Linear, down_proj: Linear):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = gate_proj, up_proj, down_proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class SparseMoE(nn.Module):
    """``gate`` (the router), ``experts`` (the routed experts held here) and
    ``shared_experts`` (or None) of MoE layer ``moe_index`` (counting MoE layers only).

    ``recorder``: an :class:`dsinfra.eplb.ExpertLoadRecorder` that counts the
    router's choices, when set. ``dispatcher``: see the module doc.
    """

    def __init__(self, moe_index: int, gate: Router, experts: GroupedExperts, shared_experts: GatedMLP | None):
        super().__init__()
        self.moe_index = moe_index
        self.gate, self.experts, self.shared_experts = gate, experts, shared_experts
        self.dispatcher = None
        self.recorder = None

    def forward(self, x: torch.Tensor, decoding: bool = False) -> torch.Tensor:
        """x: [num_tokens, hidden] -> [num_tokens, hidden]; ``decoding``: the
        tokens are a decoding step's (the dispatcher may pick its mode by it)."""
        weights, experts = self.gate(x)
        if self.recorder is not None:
            self.recorder.record(self.moe_index, experts)
        if self.dispatcher is None:
            routed = self.experts(x, experts, weights)
        else:
            routed = self.dispatcher(self.experts, x, experts, weights, decoding)
        if self.shared_experts is not None:
            routed = routed.float() + self.shared_experts(x).float()
        return routed.to(x.dtype)
