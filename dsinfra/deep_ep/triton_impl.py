"""The dispatch layout as one Triton kernel (the GPU path), like upstream's
``get_dispatch_layout`` kernel: each program takes a block of tokens, marks the
ranks and nodes each token goes to, and adds its counts to the per-expert,
per-rank and per-node totals with integer atomics (so the result does not
depend on the order the programs run in). A program's [tokens, ranks] table
holds at most 1024 entries (8 a thread), so 64 ranks fit in registers."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dsinfra.triton_utils import CompileCase, Target, capturing, launch, meta_tensor


@triton.jit
def _layout_kernel(
    topk_idx_ptr,
    num_tokens,
    per_expert_ptr,
    per_rank_ptr,
    per_node_ptr,
    is_token_in_rank_ptr,
    NUM_TOPK: tl.constexpr,
    EXPERTS_PER_RANK: tl.constexpr,
    NUM_RANKS: tl.constexpr,
    RANKS_POW2: tl.constexpr,
    RANKS_PER_NODE: tl.constexpr,
    NUM_NODES: tl.constexpr,
    NODES_POW2: tl.constexpr,
    BLOCK_TOKENS: tl.constexpr,
):
    tokens = tl.program_id(0) * BLOCK_TOKENS + tl.arange(0, BLOCK_TOKENS)
    token_mask = tokens < num_tokens
    ranks = tl.arange(0, RANKS_POW2)
    nodes = tl.arange(0, NODES_POW2)
    in_rank = tl.zeros([BLOCK_TOKENS, RANKS_POW2], dtype=tl.int32)
    in_node = tl.zeros([BLOCK_TOKENS, NODES_POW2], dtype=tl.int32)
    for k in tl.static_range(NUM_TOPK):
        expert = tl.load(topk_idx_ptr + tokens.to(tl.int64) * NUM_TOPK + k, mask=token_mask, other=-1)
        valid = expert >= 0
        tl.atomic_add(per_expert_ptr + expert, 1, mask=valid)
        rank = tl.where(valid, expert // EXPERTS_PER_RANK, -1)
        node = tl.where(valid, rank // RANKS_PER_NODE, -1)
        in_rank = tl.maximum(in_rank, (rank[:, None] == ranks[None, :]).to(tl.int32))
        in_node = tl.maximum(in_node, (node[:, None] == nodes[None, :]).to(tl.int32))
    out_mask = token_mask[:, None] & (ranks[None, :] < NUM_RANKS)
    tl.store(is_token_in_rank_ptr + tokens.to(tl.int64)[:, None] * NUM_RANKS + ranks[None, :], in_rank.to(tl.int8), mask=out_mask)
    tl.atomic_add(per_rank_ptr + ranks, tl.sum(in_rank, axis=0), mask=ranks < NUM_RANKS)
    tl.atomic_add(per_node_ptr + nodes, tl.sum(in_node, axis=0), mask=nodes < NUM_NODES)


def get_dispatch_layout(
    topk_idx: torch.Tensor, num_experts: int, num_ranks: int, num_nodes: int
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """See :func:`dsinfra.deep_ep.reference.get_dispatch_layout`."""
    num_tokens, num_topk = topk_idx.shape
    device = topk_idx.device
    per_expert = torch.zeros(num_experts, dtype=torch.int32, device=device)
    per_rank = torch.zeros(num_ranks, dtype=torch.int32, device=device)
    per_node = torch.zeros(num_nodes, dtype=torch.int32, device=device)
    is_token_in_rank = torch.empty(num_tokens, num_ranks, dtype=torch.int8, device=device)
    ranks_pow2 = triton.next_power_of_2(num_ranks)
    block_tokens = max(16, min(128, 1024 // ranks_pow2))
    if num_tokens and num_topk:
        launch(
            _layout_kernel, (triton.cdiv(num_tokens, block_tokens),),
            topk_idx.contiguous(),
            num_tokens,
            per_expert,
            per_rank,
            per_node,
            is_token_in_rank,
            NUM_TOPK=num_topk,
            EXPERTS_PER_RANK=num_experts // num_ranks,
            NUM_RANKS=num_ranks,
            RANKS_POW2=ranks_pow2,
            RANKS_PER_NODE=num_ranks // num_nodes,
            NUM_NODES=num_nodes,
            NODES_POW2=triton.next_power_of_2(num_nodes),
            BLOCK_TOKENS=block_tokens,
        )
    else:
        is_token_in_rank.zero_()
    return per_rank, per_node if num_nodes > 1 else None, per_expert, is_token_in_rank.view(torch.bool)


def compile_cases(target: Target) -> list[CompileCase]:
    """The layout of DeepSeek-V3's routing (256 experts, top-8, 4096 tokens) over
    8 ranks on one node and 64 ranks on 8 nodes."""
    cases = []
    for num_ranks, num_nodes in ((8, 1), (64, 8)):
        with capturing(target) as launches:
            get_dispatch_layout(meta_tensor(4096, 8, dtype=torch.int64), 256, num_ranks, num_nodes)
        cases.append(CompileCase({"ranks": num_ranks, "nodes": num_nodes}, launches[0], representative=num_ranks == 64))
    return cases
