"""Hierarchical normal mode, for groups that span several nodes (upstream's
internode kernels): a token crosses between nodes once per destination node,
then fans out inside it.

With ``L`` ranks per node, rank ``(node n, local l)`` sends each token once to
the rank with the same local index ``l`` on every node that holds one of its
experts (stage 1, "RDMA"; on its own node that rank is itself), together with
the token's row of ``is_token_in_rank``. That forwarding rank sends the token
on to the ranks of its node that need it (stage 2, "NVLink"). The receiver
reorders what arrives (grouped by forwarder) into the contract's order:
source rank, then source token. Combine runs the same way back: each
forwarder sums what its node's ranks return for a token (float32, cast back
to the data's dtype), and sends one row per token and node across the nodes,
which the source sums.

Stage 1 completes inside the call (stage 2 needs what it brought); with
``async_finish`` only stage 2 overlaps the caller's work.
"""

from __future__ import annotations

import dataclasses

import torch

from dsinfra.deep_ep.comm import Comm, Topology
from dsinfra.deep_ep.handles import Layout
from dsinfra.deep_ep.normal import Transfer, send_order, sum_rows
from dsinfra.deep_ep.rows import RowFormat


@dataclasses.dataclass(frozen=True)
class Routes:
    """Rows this rank sends to / receives from each rank in both stages."""

    stage1_send: list[int]  # to the forwarder of each destination node (same local index)
    stage1_recv: list[int]  # from the ranks with this local index on every node
    stage2_send: list[int]  # forwarded to the ranks of this node
    stage2_recv: list[int]  # from the forwarders of this node


def routes(topology: Topology, tokens_to_rank, tokens_to_node, rank: int | None = None) -> Routes:
    """The stage sizes of ``rank`` (this rank by default), from every rank's counts."""
    me = topology.rank if rank is None else rank
    node, local = topology.node(me), topology.local(me)
    nodes, ranks = range(topology.num_nodes), range(topology.num_ranks)
    per_node = topology.num_ranks_per_node

    def forwarded(forwarder_local: int, destination: int) -> int:
        """Tokens that reach ``destination`` through its node's forwarder ``forwarder_local``."""
        return sum(tokens_to_rank[n * per_node + forwarder_local][destination] for n in nodes)

    same_local = [topology.local(r) == local for r in ranks]
    same_node = [topology.node(r) == node for r in ranks]
    return Routes(
        stage1_send=[tokens_to_node[me][topology.node(r)] if same_local[r] else 0 for r in ranks],
        stage1_recv=[tokens_to_node[r][node] if same_local[r] else 0 for r in ranks],
        stage2_send=[forwarded(local, r) if same_node[r] else 0 for r in ranks],
        stage2_recv=[forwarded(topology.local(r), me) if same_node[r] else 0 for r in ranks],
    )


def make_layout(topology: Topology, is_token_in_rank: torch.Tensor, tokens_to_rank, tokens_to_node, num_worst_tokens: int) -> Layout:
    """The layout of a hierarchical dispatch: rows go to nodes, node by node
    (``forward_row_idx`` is filled in once stage 1 has arrived)."""
    num_tokens = is_token_in_rank.shape[0]
    in_node = is_token_in_rank.view(num_tokens, topology.num_nodes, topology.num_ranks_per_node).any(dim=2)
    return Layout(
        is_token_in_rank=is_token_in_rank,
        send_token_idx=send_order(in_node, sum(tokens_to_node[topology.rank])),
        tokens_to_rank=tuple(map(tuple, tokens_to_rank)),
        tokens_to_node=tuple(map(tuple, tokens_to_node)),
        recv_order=_recv_order(topology, tokens_to_rank).to(is_token_in_rank.device),
        num_worst_tokens=num_worst_tokens,
    )


def _recv_order(topology: Topology, tokens_to_rank) -> torch.Tensor:
    """Rows arrive grouped by forwarder (local index l), each forwarder's by
    source node; the result wants them by source rank ``n * L + l``."""
    me, per_node = topology.rank, topology.num_ranks_per_node
    start, offset = {}, 0
    for local in range(per_node):
        for node in range(topology.num_nodes):
            start[node, local] = offset
            offset += tokens_to_rank[node * per_node + local][me]
    pieces = [
        torch.arange(start[node, local], start[node, local] + tokens_to_rank[node * per_node + local][me])
        for node in range(topology.num_nodes)
        for local in range(per_node)
    ]
    return torch.cat(pieces)


def dispatch_rows(comm: Comm, fmt: RowFormat, fields: list[torch.Tensor], layout: Layout) -> tuple[Transfer, Layout]:
    """Stage 1 (completed here), then start stage 2; see
    :func:`dsinfra.deep_ep.normal.dispatch_rows`. Also returns the layout,
    completed with the forwarding order when it lacked it."""
    topology = comm.topology
    route = routes(topology, layout.tokens_to_rank, layout.tokens_to_node)
    device = fields[0].device
    first = layout.forward_row_idx is None
    stage1 = RowFormat(fields + [layout.is_token_in_rank]) if first else fmt
    send = stage1.pack(fields + [layout.is_token_in_rank] if first else fields, layout.send_token_idx)
    arrived = torch.empty(sum(route.stage1_recv), stage1.row_bytes, dtype=torch.uint8, device=device)
    comm.all_to_all(arrived, send, route.stage1_recv, route.stage1_send)
    if first:
        node_ranks = topology.node_ranks(topology.node(topology.rank))
        needs = arrived[:, fmt.row_bytes + node_ranks.start : fmt.row_bytes + node_ranks.stop] != 0
        layout = dataclasses.replace(layout, forward_row_idx=send_order(needs, sum(route.stage2_send)))
    forward = arrived[:, : fmt.row_bytes].index_select(0, layout.forward_row_idx)
    outputs = fmt.empty(layout.num_recv_rows(topology.rank), device)
    rows = torch.empty(sum(route.stage2_recv), fmt.row_bytes, dtype=torch.uint8, device=device)
    work = comm.all_to_all(rows, forward, route.stage2_recv, route.stage2_send, async_op=True)
    arrived_outputs = [out[: rows.shape[0]] for out in outputs]
    return (outputs, [work], lambda: fmt.unpack_into(rows, arrived_outputs, index=layout.recv_order)), layout


def combine_rows(comm: Comm, fmt: RowFormat, fields: list[torch.Tensor], layout: Layout, bias: tuple[torch.Tensor, ...] = ()) -> Transfer:
    """Stage 2 back and the forwarders' sums (completed here), then start
    stage 1 back; see :func:`dsinfra.deep_ep.normal.combine_rows`."""
    route = routes(comm.topology, layout.tokens_to_rank, layout.tokens_to_node)
    device = fields[0].device
    rows = fmt.pack(fields)
    by_forwarder = torch.empty_like(rows).index_copy_(0, layout.recv_order, rows)
    returned = torch.empty(sum(route.stage2_send), fmt.row_bytes, dtype=torch.uint8, device=device)
    comm.all_to_all(returned, by_forwarder, route.stage2_send, route.stage2_recv)
    num_arrived = sum(route.stage1_recv)
    partial = [
        sum_rows(field, layout.forward_row_idx, route.stage2_send, num_arrived).to(field.dtype) for field in fmt.unpack(returned)
    ]
    back = torch.empty(sum(route.stage1_send), fmt.row_bytes, dtype=torch.uint8, device=device)
    work = comm.all_to_all(back, fmt.pack(partial), route.stage1_send, route.stage1_recv, async_op=True)
    num_tokens = layout.is_token_in_rank.shape[0]
    outputs = [torch.empty((num_tokens, *f.shape[1:]), dtype=f.dtype, device=device) for f in fields]

    def finish() -> None:
        for out, field, field_bias in zip(outputs, fmt.unpack(back), (bias, ())):
            out.copy_(sum_rows(field, layout.send_token_idx, route.stage1_send, num_tokens, field_bias))

    return outputs, [work], finish


def receive_bytes(
    topology: Topology, layout: Layout, row_bytes: int, *, combine: bool
) -> tuple[list[int], list[int]]:
    """Bytes each rank receives within its node and from other nodes in one
    hierarchical dispatch (or combine) of rows of ``row_bytes`` (stage-1 rows of
    a first dispatch carry ``num_ranks`` more bytes)."""
    intranode, internode = [], []
    stage1_row = row_bytes + (topology.num_ranks if not combine and layout.forward_row_idx is None else 0)
    for rank in range(topology.num_ranks):
        route = routes(topology, layout.tokens_to_rank, layout.tokens_to_node, rank)
        other_nodes = [r for r in range(topology.num_ranks) if topology.node(r) != topology.node(rank)]
        if combine:
            intranode.append(sum(route.stage2_send) * row_bytes)
            internode.append(sum(route.stage1_send[r] for r in other_nodes) * row_bytes)
        else:
            intranode.append(sum(route.stage2_recv) * row_bytes)
            internode.append(sum(route.stage1_recv[r] for r in other_nodes) * stage1_row)
    return intranode, internode
