"""DeepEP's expert-parallel communication (dispatch and combine for MoE
layers) over ``torch.distributed``: gloo on CPUs, NCCL on GPUs.

The API of DeepEP V1 (``deep_ep.Buffer`` and friends)::

    from dsinfra.deep_ep import Buffer, Config, EventOverlap

    buffer = Buffer(group, num_nvl_bytes=int(1e9))
    num_tokens_per_rank, num_tokens_per_rdma_rank, num_tokens_per_expert, is_token_in_rank, _ = \\
        buffer.get_dispatch_layout(topk_idx, num_experts)
    recv_x, recv_topk_idx, recv_topk_weights, num_recv_tokens_per_expert_list, handle, _ = buffer.dispatch(
        x, topk_idx=topk_idx, topk_weights=topk_weights, num_tokens_per_rank=num_tokens_per_rank,
        num_tokens_per_rdma_rank=num_tokens_per_rdma_rank, is_token_in_rank=is_token_in_rank,
        num_tokens_per_expert=num_tokens_per_expert)
    combined_x, _, _ = buffer.combine(expert_output, handle)

:mod:`dsinfra.deep_ep.autograd` makes dispatch and combine differentiable.
See docs/deep_ep.md.
"""

import torch

from dsinfra.deep_ep.buffer import Buffer
from dsinfra.deep_ep.comm import Traffic
from dsinfra.deep_ep.config import Config
from dsinfra.deep_ep.event import EventHandle, EventOverlap
from dsinfra.deep_ep.handles import DispatchHandle, InternodeHandle, IntranodeHandle, LowLatencyHandle

# The dtype of expert indices (upstream's ``deep_ep.topk_idx_t``).
topk_idx_t = torch.int64

# Operations served by dsinfra.backend (reference / torch / triton).
OPERATIONS = ("get_dispatch_layout",)

__all__ = [
    "Buffer",
    "Config",
    "DispatchHandle",
    "EventHandle",
    "EventOverlap",
    "InternodeHandle",
    "IntranodeHandle",
    "LowLatencyHandle",
    "OPERATIONS",
    "Traffic",
    "topk_idx_t",
]
