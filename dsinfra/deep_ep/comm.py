"""The group a Buffer talks over: where its ranks live (:class:`Topology`), the
bytes it has sent (:class:`Traffic`), and the collectives that move rows and
count those bytes (:class:`Comm`).

The group's ranks are laid out node-major: ``num_ranks_per_node`` consecutive
ranks share a node (upstream: the ranks of one NVLink domain). Ranks per node
come from the constructor argument, else from ``LOCAL_WORLD_SIZE`` (set by
``torchrun``; it counts the world's ranks per node, so the group's members are
placed by their global ranks), else from upstream's own rule: a group of more
than 8 ranks (a multiple of 8) sits 8 to a node, as many as upstream's NVLink
domains hold (its tests start 8 ranks on each node themselves, without
torchrun); a smaller group is one node.
"""

from __future__ import annotations

import dataclasses
import math
import os

import torch
import torch.distributed as dist

from dsinfra.validation import check_positive

NVL_PEERS = 8  # upstream's NUM_MAX_NVL_PEERS: the ranks of one NVLink domain


@dataclasses.dataclass(frozen=True)
class Topology:
    """``num_ranks`` ranks, ``num_ranks_per_node`` per node, seen from ``rank``."""

    rank: int
    num_ranks: int
    num_ranks_per_node: int

    @property
    def num_nodes(self) -> int:
        return self.num_ranks // self.num_ranks_per_node

    def node(self, rank: int) -> int:
        return rank // self.num_ranks_per_node

    def local(self, rank: int) -> int:
        return rank % self.num_ranks_per_node

    def node_ranks(self, node: int) -> range:
        return range(node * self.num_ranks_per_node, (node + 1) * self.num_ranks_per_node)


def group_topology(group: dist.ProcessGroup, num_ranks_per_node: int | None) -> Topology:
    """The topology of ``group`` as seen from this process."""
    rank, num_ranks = group.rank(), group.size()
    if num_ranks_per_node is not None:
        check_positive("num_ranks_per_node", num_ranks_per_node)
        if num_ranks % num_ranks_per_node:
            raise ValueError(
                f"num_ranks_per_node ({num_ranks_per_node}) must divide the group's size ({num_ranks})"
            )
        return Topology(rank, num_ranks, num_ranks_per_node)
    nodes = member_nodes(group)
    if nodes is None:
        per_node = NVL_PEERS if num_ranks > NVL_PEERS and num_ranks % NVL_PEERS == 0 else num_ranks
        return Topology(rank, num_ranks, per_node)
    per_node = node_major_ranks_per_node(nodes)
    if per_node is None:
        raise ValueError(
            f"the group's ranks must be spread evenly over nodes, node by node; with "
            f"LOCAL_WORLD_SIZE={os.environ['LOCAL_WORLD_SIZE']} its ranks sit on nodes {nodes}"
        )
    return Topology(rank, num_ranks, per_node)


def member_nodes(group: dist.ProcessGroup) -> list[int] | None:
    """The node of each member of ``group``, from ``LOCAL_WORLD_SIZE`` (the
    world's ranks per node, as torchrun sets it); None when it is not set."""
    local_world_size = os.environ.get("LOCAL_WORLD_SIZE")
    if not local_world_size:
        return None
    if not local_world_size.isdigit() or int(local_world_size) < 1:
        raise ValueError(f"LOCAL_WORLD_SIZE must be a positive integer; got {local_world_size!r}")
    return [global_rank // int(local_world_size) for global_rank in dist.get_process_group_ranks(group)]


def node_major_ranks_per_node(nodes: list[int]) -> int | None:
    """Ranks per node when the members (on ``nodes``, in group order) sit node
    by node, the same number on each node; None otherwise."""
    sizes = {node: nodes.count(node) for node in nodes}
    node_major = all(nodes[i] == nodes[i - 1] or nodes[i] not in nodes[:i] for i in range(1, len(nodes)))
    if len(set(sizes.values())) != 1 or not node_major:
        return None
    return sizes[nodes[0]]


@dataclasses.dataclass
class Traffic:
    """Payload bytes this rank has sent to other ranks, by where they went;
    every transfer of tokens adds to it. Rows a rank keeps for itself are not
    sent and not counted, nor are the few integers of the count exchange."""

    intranode_bytes: int = 0
    internode_bytes: int = 0

    def add(self, topology: Topology, rows_per_rank: list[int], row_bytes: int) -> None:
        """Count ``rows_per_rank[r]`` rows of ``row_bytes`` sent to each rank r."""
        me = topology.rank
        for rank, rows in enumerate(rows_per_rank):
            if rank == me:
                continue
            if topology.node(rank) == topology.node(me):
                self.intranode_bytes += rows * row_bytes
            else:
                self.internode_bytes += rows * row_bytes

    def reset(self) -> None:
        self.intranode_bytes = self.internode_bytes = 0


@dataclasses.dataclass
class Comm:
    """A process group with its topology; every transfer counts its bytes in ``traffic``."""

    group: dist.ProcessGroup
    topology: Topology
    traffic: Traffic = dataclasses.field(default_factory=Traffic)

    def all_to_all(
        self,
        recv: torch.Tensor,
        send: torch.Tensor,
        recv_rows: list[int] | None = None,
        send_rows: list[int] | None = None,
        *,
        async_op: bool = False,
    ):
        """Rows ``send [n, ...]`` out, ``send_rows[r]`` of them to rank r in rank
        order; ``recv_rows[r]`` rows in from rank r into ``recv``. Without row
        counts every rank gets an equal share. Returns the work when ``async_op``."""
        row_bytes = math.prod(send.shape[1:]) * send.element_size()
        counts = send_rows if send_rows is not None else [send.shape[0] // self.topology.num_ranks] * self.topology.num_ranks
        self.traffic.add(self.topology, counts, row_bytes)
        return dist.all_to_all_single(recv, send.contiguous(), recv_rows, send_rows, group=self.group, async_op=async_op)

    def all_gather(self, recv: torch.Tensor, send: torch.Tensor, *, async_op: bool = False):
        """Every rank's ``send`` into ``recv [num_ranks, *send.shape]``, in rank order."""
        self.traffic.add(self.topology, [1] * self.topology.num_ranks, send.numel() * send.element_size())
        return dist.all_gather(list(recv.unbind(0)), send, group=self.group, async_op=async_op)
