"""The handles dispatch returns: tuples of upstream's length and order, so code
that indexes or unpacks them (``handle[0]``, ``handle[-4]``, ``a, b, ... = handle``)
works unchanged, plus ``handle.layout``, the routing this implementation reuses.

Upstream's fields that describe its kernels' channels and ring buffers
(``channel_prefix_matrix``, ``send_head``, ``recv_src_meta``, ...) have no
counterpart here, where a transfer is one collective: they are ``None``. The
fields that describe where tokens go are filled:

- :class:`IntranodeHandle` (6 fields): ``rank_prefix_matrix`` ([num_ranks,
  num_ranks] int32, entry [i][j]: tokens ranks 0..i sent to rank j) and
  ``is_token_in_rank``.
- :class:`InternodeHandle` (10 fields): ``is_token_in_rank``,
  ``recv_rdma_rank_prefix_sum`` ([num_nodes] int32: tokens this rank's
  forwarding stage received from nodes 0..n) and ``recv_gbl_rank_prefix_sum``
  ([num_ranks] int32: rows this rank received from ranks 0..i), ``handle[-4]``.
- :class:`LowLatencyHandle` (5 fields): ``src_info``, ``layout_range``,
  ``num_max_dispatch_tokens_per_rank``, ``hidden``, ``num_experts``, all filled.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import torch

from dsinfra.deep_ep.event import EventHandle


@dataclasses.dataclass(frozen=True)
class Layout:
    """What a normal-mode dispatch leaves for combine and cached dispatch."""

    is_token_in_rank: torch.Tensor  # [num_tokens, num_ranks] bool, this rank's tokens
    send_token_idx: torch.Tensor  # int64: the token of each row sent (to ranks, or in hierarchical mode to nodes)
    tokens_to_rank: tuple[tuple[int, ...], ...]  # [i][j]: tokens rank i sends to rank j
    tokens_to_node: tuple[tuple[int, ...], ...] | None  # hierarchical: [i][n] tokens rank i sends to node n
    recv_order: torch.Tensor | None  # hierarchical: received row i of the result is forwarded row recv_order[i]
    forward_row_idx: torch.Tensor | None = None  # hierarchical: the arrived row of each row forwarded inside the node
    num_worst_tokens: int = 0  # rows of recv_x when the dispatch asked for a fixed count (0: the rows received)

    def num_recv(self, rank: int) -> int:
        """Rows ``rank`` receives."""
        return sum(row[rank] for row in self.tokens_to_rank)

    def num_recv_rows(self, rank: int) -> int:
        """Rows of ``rank``'s recv_x: the rows received, or num_worst_tokens."""
        return self.num_worst_tokens or self.num_recv(rank)


class DispatchHandle:
    """What every normal-mode handle has besides its upstream fields."""

    layout: Layout


class _IntranodeFields(NamedTuple):
    rank_prefix_matrix: torch.Tensor
    channel_prefix_matrix: None
    recv_channel_prefix_matrix: None
    recv_src_idx: None
    is_token_in_rank: torch.Tensor
    send_head: None


class IntranodeHandle(_IntranodeFields, DispatchHandle):
    """The handle of a dispatch within one node (upstream's 6-tuple)."""


class _InternodeFields(NamedTuple):
    is_token_in_rank: torch.Tensor
    rdma_channel_prefix_matrix: None
    gbl_channel_prefix_matrix: None
    recv_rdma_channel_prefix_matrix: None
    recv_rdma_rank_prefix_sum: torch.Tensor
    recv_gbl_channel_prefix_matrix: None
    recv_gbl_rank_prefix_sum: torch.Tensor
    recv_src_meta: None
    send_rdma_head: None
    send_nvl_head: None


class InternodeHandle(_InternodeFields, DispatchHandle):
    """The handle of a hierarchical dispatch across nodes (upstream's 10-tuple)."""


def public_handle(layout: Layout, rank: int, num_ranks_per_node: int) -> IntranodeHandle | InternodeHandle:
    """``layout`` as upstream's tuple for this rank."""
    device = layout.is_token_in_rank.device
    prefix = torch.tensor(layout.tokens_to_rank, dtype=torch.int32).cumsum(dim=0).to(torch.int32)
    if layout.tokens_to_node is None:
        handle = IntranodeHandle(prefix.to(device), None, None, None, layout.is_token_in_rank, None)
    else:
        node, local = divmod(rank, num_ranks_per_node)
        num_nodes = len(layout.tokens_to_node[0])
        from_nodes = [layout.tokens_to_node[n * num_ranks_per_node + local][node] for n in range(num_nodes)]
        rdma_prefix = torch.tensor(from_nodes, dtype=torch.int32).cumsum(dim=0).to(torch.int32)
        handle = InternodeHandle(
            layout.is_token_in_rank, None, None, None, rdma_prefix.to(device), None, prefix[:, rank].contiguous().to(device), None, None, None
        )
    handle.layout = layout
    return handle


class _LowLatencyFields(NamedTuple):
    src_info: torch.Tensor  # [num_local_experts, num_ranks * max_tokens] int32: source token of each slot, -1 past the count
    layout_range: torch.Tensor  # [num_local_experts, num_ranks] int64: (first slot << 32) | count, per source rank
    num_max_dispatch_tokens_per_rank: int
    hidden: int
    num_experts: int


class LowLatencyHandle(_LowLatencyFields):
    """What low-latency combine needs from its dispatch (upstream's 5-tuple).

    Attributes besides the fields: ``slot_rows`` ([num_local_experts, num_ranks
    * max_tokens] int64: the arrived row of each slot, num_ranks * max_tokens
    past the count) and ``arrival`` (the event that completes the dispatch,
    which fills the tensors; None once it is complete).
    """

    slot_rows: torch.Tensor
    arrival: EventHandle | None = None
