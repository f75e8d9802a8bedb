"""Normal-mode dispatch and combine within one node: one all-to-all each way.

Dispatch sends each token once to every rank that holds at least one of its
experts: rank r sends, in rank order, the rows of its tokens that go to rank 0,
then those that go to rank 1, ... each in token order, so every rank receives
its rows ordered by source rank, then source token. Combine sends each
received row back the same way and the source sums, for each of its tokens,
the rows that come back (in float32, rank by rank, so the sum does not depend
on timing).

The handle carries what both directions reuse: the rank prefix matrix
(``handle[0]``, as upstream), the sender's ``is_token_in_rank``, the token of
each row sent, and every rank's counts (host integers, known to all ranks
after the count exchange).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch

from dsinfra.deep_ep.comm import Comm, Topology
from dsinfra.deep_ep.rows import RowFormat


class DispatchHandle(NamedTuple):
    """What a normal-mode dispatch leaves for combine and cached dispatch."""

    rank_prefix_matrix: torch.Tensor  # [num_ranks, num_ranks] int32: [i][j] tokens sent to rank j by ranks 0..i
    is_token_in_rank: torch.Tensor  # [num_tokens, num_ranks] bool, this rank's tokens
    send_token_idx: torch.Tensor  # int64: the token of each row sent (to ranks, or in hierarchical mode to nodes)
    tokens_to_rank: tuple[tuple[int, ...], ...]  # [i][j]: tokens rank i sends to rank j
    tokens_to_node: tuple[tuple[int, ...], ...] | None  # hierarchical: [i][n] tokens rank i sends to node n
    forward_row_idx: torch.Tensor | None  # hierarchical: the arrived row of each row forwarded inside the node
    recv_order: torch.Tensor | None  # hierarchical: received row i of the result is forwarded row recv_order[i]


def true_positions(mask: torch.Tensor, count: int) -> torch.Tensor:
    """Flat positions (int64, ascending) of the ``count`` true entries of
    ``mask``; a stable sort rather than ``nonzero`` so a GPU needs no host sync."""
    order = torch.argsort((~mask).flatten().to(torch.uint8), stable=True)
    return order[:count]


def send_order(is_token_in_rank: torch.Tensor, total: int) -> torch.Tensor:
    """The token of each row sent, destination-major then token order:
    ``is_token_in_rank [num_tokens, num_destinations]`` with ``total`` true entries."""
    num_tokens = is_token_in_rank.shape[0]
    return true_positions(is_token_in_rank.t(), total) % max(num_tokens, 1)


def make_handle(
    topology: Topology,
    is_token_in_rank: torch.Tensor,
    tokens_to_rank: list[list[int]],
    *,
    send_token_idx: torch.Tensor | None = None,
    tokens_to_node: list[list[int]] | None = None,
    recv_order: torch.Tensor | None = None,
) -> DispatchHandle:
    """A dispatch's handle, from the all-gathered counts: flat (rows go to
    ranks), or with the hierarchical parts given (rows go to nodes;
    ``forward_row_idx`` is filled in once stage 1 has arrived)."""
    if send_token_idx is None:
        send_token_idx = send_order(is_token_in_rank, sum(tokens_to_rank[topology.rank]))
    prefix = torch.tensor(tokens_to_rank, dtype=torch.int32).cumsum(dim=0).to(torch.int32)
    return DispatchHandle(
        rank_prefix_matrix=prefix.to(is_token_in_rank.device),
        is_token_in_rank=is_token_in_rank,
        send_token_idx=send_token_idx,
        tokens_to_rank=tuple(map(tuple, tokens_to_rank)),
        tokens_to_node=tuple(map(tuple, tokens_to_node)) if tokens_to_node is not None else None,
        forward_row_idx=None,
        recv_order=recv_order,
    )


Transfer = tuple[list[torch.Tensor], list, Callable[[], None]]  # outputs, works to wait for, finishing step


def dispatch_rows(comm: Comm, fmt: RowFormat, fields: list[torch.Tensor], handle: DispatchHandle) -> Transfer:
    """Start sending ``fields`` (each ``[num_tokens, ...]``) by ``handle``'s layout.

    Returns the received fields (complete once the works are waited for and
    the finishing step has run), the works and the finishing step.
    """
    me = comm.topology.rank
    send = fmt.pack(fields, handle.send_token_idx)
    received = [row[me] for row in handle.tokens_to_rank]
    outputs = fmt.empty(sum(received), fields[0].device)
    rows = fmt.receive_buffer(outputs)
    work = comm.all_to_all(rows, send, received, list(handle.tokens_to_rank[me]), async_op=True)
    return outputs, [work], lambda: fmt.unpack_into(rows, outputs)


def combine_rows(comm: Comm, fmt: RowFormat, fields: list[torch.Tensor], handle: DispatchHandle) -> Transfer:
    """Start sending each received row's ``fields`` back to its source; the
    finishing step sums them per source token into the outputs (float32
    accumulation, outputs in the fields' dtypes, zeros for tokens sent nowhere)."""
    me = comm.topology.rank
    sent = list(handle.tokens_to_rank[me])
    num_tokens = handle.is_token_in_rank.shape[0]
    rows = torch.empty(sum(sent), fmt.row_bytes, dtype=torch.uint8, device=fields[0].device)
    work = comm.all_to_all(rows, fmt.pack(fields), sent, [row[me] for row in handle.tokens_to_rank], async_op=True)
    outputs = [torch.empty((num_tokens, *f.shape[1:]), dtype=f.dtype, device=f.device) for f in fields]

    def finish() -> None:
        for out, back in zip(outputs, fmt.unpack(rows)):
            out.copy_(sum_rows(back, handle.send_token_idx, sent, num_tokens))

    return outputs, [work], finish


def sum_rows(rows: torch.Tensor, index: torch.Tensor, chunk_sizes: list[int], num_out: int) -> torch.Tensor:
    """float32 ``out[index[i]] += rows[i]``, chunk by chunk: within a chunk
    (the rows of one peer) indices are distinct, so no two additions race and
    the sum is the same on every run, GPUs included."""
    out = torch.zeros((num_out, *rows.shape[1:]), dtype=torch.float32, device=rows.device)
    start = 0
    for size in chunk_sizes:
        if size:
            out.index_add_(0, index[start : start + size], rows[start : start + size].float())
        start += size
    return out


def receive_bytes(
    topology: Topology, handle: DispatchHandle, row_bytes: int, *, combine: bool
) -> tuple[list[int], list[int]]:
    """Bytes each rank receives within its node and from other nodes (none
    here) in one flat dispatch (or combine) of rows of ``row_bytes``."""
    counts = handle.tokens_to_rank
    ranks = range(topology.num_ranks)
    if combine:
        return [sum(counts[r]) * row_bytes for r in ranks], [0 for _ in ranks]
    return [sum(row[r] for row in counts) * row_bytes for r in ranks], [0 for _ in ranks]


def localize_topk(topk_idx: torch.Tensor, topk_weights: torch.Tensor, rank: int, num_local_experts: int) -> None:
    """In place: global expert ids -> this rank's local ids, -1 (weight 0) for
    experts held elsewhere."""
    local = topk_idx - rank * num_local_experts
    held = (topk_idx >= 0) & (local >= 0) & (local < num_local_experts)
    topk_idx.copy_(torch.where(held, local, -1))
    topk_weights.masked_fill_(~held, 0.0)
