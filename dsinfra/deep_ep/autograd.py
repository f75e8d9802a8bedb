"""Differentiable dispatch and combine, so a MoE layer trains through them.

Dispatch copies each token to the ranks that need it, so its backward sums
the copies' gradients back: a combine. Combine sums the copies, so its
backward copies the gradient out again: a cached dispatch. Both run
collectives in the backward pass, so every rank of the group must
backpropagate through every dispatch and combine, in the same order (as
autograd does when all ranks run the same model)::

    from dsinfra.deep_ep import autograd as ep

    recv_x, recv_topk_idx, recv_topk_weights, counts, handle = ep.dispatch(buffer, x, topk_idx, topk_weights, num_experts)
    y = torch.zeros_like(recv_x)
    for e, expert in enumerate(local_experts):
        rows, k = (recv_topk_idx == e).nonzero(as_tuple=True)
        y.index_add_(0, rows, expert(recv_x[rows]) * recv_topk_weights[rows, k, None].to(y.dtype))
    out = ep.combine(buffer, y, handle)          # [num_tokens, hidden], the MoE layer's output
"""

from __future__ import annotations

import torch

from dsinfra.deep_ep.buffer import Buffer
from dsinfra.deep_ep.handles import DispatchHandle


class _Dispatch(torch.autograd.Function):
    @staticmethod
    def forward(ctx, buffer: Buffer, x, topk_idx, topk_weights, num_experts: int, expert_alignment: int, backward_buffer: Buffer):
        per_rank, per_rdma_rank, per_expert, in_rank, _ = buffer.get_dispatch_layout(topk_idx, num_experts)
        recv_x, recv_topk_idx, recv_topk_weights, counts, handle, _ = buffer.dispatch(
            x,
            topk_idx=topk_idx,
            topk_weights=topk_weights,
            num_tokens_per_rank=per_rank,
            num_tokens_per_rdma_rank=per_rdma_rank,
            is_token_in_rank=in_rank,
            num_tokens_per_expert=per_expert,
            expert_alignment=expert_alignment,
        )
        ctx.buffer, ctx.handle, ctx.recv_x_like = backward_buffer, handle, (recv_x.shape, recv_x.dtype)
        ctx.save_for_backward(recv_topk_idx)
        ctx.mark_non_differentiable(recv_topk_idx)
        return recv_x, recv_topk_idx, recv_topk_weights, counts, handle

    @staticmethod
    def backward(ctx, grad_recv_x, _grad_topk_idx, grad_recv_topk_weights, *_unused):
        (recv_topk_idx,) = ctx.saved_tensors
        # Every rank must send the same fields back, whatever its local graph used.
        if grad_recv_x is None:
            shape, dtype = ctx.recv_x_like
            grad_recv_x = torch.zeros(shape, dtype=dtype, device=recv_topk_idx.device)
        if grad_recv_topk_weights is None:
            grad_recv_topk_weights = torch.zeros(recv_topk_idx.shape, dtype=torch.float32, device=recv_topk_idx.device)
        # Weights of experts held elsewhere arrived as constants 0: no gradient flows to them.
        grad_recv_topk_weights = grad_recv_topk_weights.masked_fill(recv_topk_idx < 0, 0.0).contiguous()
        grad_x, grad_topk_weights, _ = ctx.buffer.combine(grad_recv_x.contiguous(), ctx.handle, topk_weights=grad_recv_topk_weights)
        return None, grad_x, None, grad_topk_weights, None, None, None


class _Combine(torch.autograd.Function):
    @staticmethod
    def forward(ctx, buffer: Buffer, x, handle: DispatchHandle, backward_buffer: Buffer):
        combined_x, _, _ = buffer.combine(x, handle)
        ctx.buffer, ctx.handle = backward_buffer, handle
        return combined_x

    @staticmethod
    def backward(ctx, grad_combined_x):
        grad_x, *_ = ctx.buffer.dispatch(grad_combined_x.contiguous(), handle=ctx.handle)
        return None, grad_x, None, None


def dispatch(
    buffer: Buffer,
    x: torch.Tensor,
    topk_idx: torch.Tensor,
    topk_weights: torch.Tensor,
    num_experts: int,
    expert_alignment: int = 1,
    backward_buffer: Buffer | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[int], DispatchHandle]:
    """Layout and dispatch in one differentiable step (gradients flow to ``x``
    and ``topk_weights``).

    backward_buffer: the buffer whose group the backward's collective (a
    combine) runs on; default ``buffer``. A second buffer over the same ranks
    lets one micro-batch's backward run on another thread while the forward
    of the next communicates on ``buffer`` (DualPipe's overlap): each group
    then sees its collectives in the same order on every rank.

    x: [num_tokens, hidden] bfloat16 (or float16/float32); topk_idx:
    [num_tokens, num_topk] int64 (-1 for none); topk_weights: [num_tokens, num_topk] float32.

    Returns (recv_x, recv_topk_idx, recv_topk_weights,
    num_recv_tokens_per_expert_list, handle), as :meth:`Buffer.dispatch`.
    """
    return _Dispatch.apply(buffer, x, topk_idx, topk_weights, num_experts, expert_alignment, backward_buffer or buffer)


def combine(
    buffer: Buffer, x: torch.Tensor, handle: DispatchHandle, backward_buffer: Buffer | None = None
) -> torch.Tensor:
    """Differentiable :meth:`Buffer.combine` of ``x`` [num_recv_tokens, hidden]:
    the per-token sums [num_tokens, hidden] in the original token order.
    ``backward_buffer``: as in :func:`dispatch` (the backward is a cached dispatch)."""
    return _Combine.apply(buffer, x, handle, backward_buffer or buffer)
