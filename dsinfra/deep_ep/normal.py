"""Normal-mode dispatch and combine within one node: one all-to-all each way.

Dispatch sends each token once to every rank that holds at least one of its
experts: rank r sends, in rank order, the rows of its tokens that go to rank 0,
then those that go to rank 1, ... each in token order, so every rank receives
its rows ordered by source rank, then source token. Combine sends each
received row back the same way and the source sums, for each of its tokens,
the rows that come back (in float32, rank by rank, so the sum does not depend
on timing).

The layout (``handle.layout``) carries what both directions reuse: the
sender's ``is_token_in_rank``, the token of each row sent, and every rank's
counts (host integers, known to all ranks after the count exchange).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from dsinfra.deep_ep.comm import Comm, Topology
from dsinfra.deep_ep.handles import Layout
from dsinfra.deep_ep.rows import RowFormat


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


def make_layout(topology: Topology, is_token_in_rank: torch.Tensor, tokens_to_rank: list[list[int]], num_worst_tokens: int) -> Layout:
    """A flat dispatch's layout (rows go to ranks), from the all-gathered counts."""
    return Layout(
        is_token_in_rank=is_token_in_rank,
        send_token_idx=send_order(is_token_in_rank, sum(tokens_to_rank[topology.rank])),
        tokens_to_rank=tuple(map(tuple, tokens_to_rank)),
        tokens_to_node=None,
        recv_order=None,
        num_worst_tokens=num_worst_tokens,
    )


Transfer = tuple[list[torch.Tensor], list, Callable[[], None]]  # outputs, works to wait for, finishing step


def dispatch_rows(comm: Comm, fmt: RowFormat, fields: list[torch.Tensor], layout: Layout) -> Transfer:
    """Start sending ``fields`` (each ``[num_tokens, ...]``) by ``layout``.

    Returns the received fields, ``layout.num_recv_rows`` rows each (complete
    once the works are waited for and the finishing step has run; rows past
    those received are left to the caller), the works and the finishing step.
    """
    me = comm.topology.rank
    send = fmt.pack(fields, layout.send_token_idx)
    received = [row[me] for row in layout.tokens_to_rank]
    outputs = fmt.empty(layout.num_recv_rows(me), fields[0].device)
    arrived = [out[: sum(received)] for out in outputs]
    rows = fmt.receive_buffer(arrived)
    work = comm.all_to_all(rows, send, received, list(layout.tokens_to_rank[me]), async_op=True)
    return outputs, [work], lambda: fmt.unpack_into(rows, arrived)


def combine_rows(comm: Comm, fmt: RowFormat, fields: list[torch.Tensor], layout: Layout, bias: tuple[torch.Tensor, ...] = ()) -> Transfer:
    """Start sending each received row's ``fields`` back to its source; the
    finishing step sums them per source token into the outputs (float32
    accumulation, outputs in the fields' dtypes, zeros for tokens sent nowhere)."""
    me = comm.topology.rank
    sent = list(layout.tokens_to_rank[me])
    num_tokens = layout.is_token_in_rank.shape[0]
    rows = torch.empty(sum(sent), fmt.row_bytes, dtype=torch.uint8, device=fields[0].device)
    work = comm.all_to_all(rows, fmt.pack(fields), sent, [row[me] for row in layout.tokens_to_rank], async_op=True)
    outputs = [torch.empty((num_tokens, *f.shape[1:]), dtype=f.dtype, device=f.device) for f in fields]

    def finish() -> None:
        for out, back, field_bias in zip(outputs, fmt.unpack(rows), (bias, ())):
            out.copy_(sum_rows(back, layout.send_token_idx, sent, num_tokens, field_bias))

    return outputs, [work], finish


def sum_rows(
    rows: torch.Tensor, index: torch.Tensor, chunk_sizes: list[int], num_out: int, bias: tuple[torch.Tensor, ...] = ()
) -> torch.Tensor:
    """float32 ``out[index[i]] += rows[i]``, chunk by chunk, starting from the
    sum of ``bias`` (tensors ``[num_out, ...]``) or zeros: within a chunk (the
    rows of one peer) indices are distinct, so no two additions race and the
    sum is the same on every run, GPUs included."""
    out = torch.zeros((num_out, *rows.shape[1:]), dtype=torch.float32, device=rows.device)
    for term in bias:
        out.add_(term)
    start = 0
    for size in chunk_sizes:
        if size:
            out.index_add_(0, index[start : start + size], rows[start : start + size].float())
        start += size
    return out


def receive_bytes(
    topology: Topology, layout: Layout, row_bytes: int, *, combine: bool
) -> tuple[list[int], list[int]]:
    """Bytes each rank receives within its node and from other nodes (none
    here) in one flat dispatch (or combine) of rows of ``row_bytes``."""
    counts = layout.tokens_to_rank
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
