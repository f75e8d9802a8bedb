"""``deep_ep.utils.envs``: the process group and seeds of DeepEP's tests.

:func:`init_dist` starts one rank of ``num_local_ranks`` per node from the
same environment variables as DeepEP's (``MASTER_ADDR``, ``MASTER_PORT``,
``WORLD_SIZE`` nodes, ``RANK`` of this node), over NCCL with a GPU and gloo
without one. DeepEP's hardware probes (NVLink and RDMA bandwidth, RDMA atomics)
have nothing to measure here and are not provided.
"""

from __future__ import annotations

import os
import random

import torch
import torch.distributed as dist

_local_rank: int | None = None
_local_seed = 0
_global_seed = 0


def init_seed(global_seed: int) -> None:
    """Seed torch and ``random`` with ``global_seed + rank`` (the local seed)."""
    global _local_seed, _global_seed
    _global_seed, _local_seed = global_seed, global_seed + dist.get_rank()
    torch.manual_seed(_local_seed)
    random.seed(_local_seed)


def get_local_seed() -> int:
    return _local_seed


def get_global_seed() -> int:
    return _global_seed


def dist_print(s: str = "", once_in_node: bool = False) -> None:
    """Print ``s`` on every rank (with ``once_in_node``, on each node's first), then a barrier."""
    if _local_rank is None:
        raise RuntimeError("dist_print needs init_dist first")
    if not once_in_node or _local_rank == 0:
        print(s, flush=True)
    dist.barrier()


def init_dist(local_rank: int, num_local_ranks: int, seed: int = 0) -> tuple[int, int, dist.ProcessGroup]:
    """Join the job as rank ``node * num_local_ranks + local_rank`` and return
    ``(rank, world_size, group)``, ``group`` holding every rank. As DeepEP's tests
    expect, torch's default dtype becomes bfloat16 (and, with a GPU, the default
    device is this rank's GPU); torch and ``random`` are seeded by :func:`init_seed`."""
    global _local_rank
    address = os.getenv("MASTER_ADDR", "127.0.0.1")
    port = int(os.getenv("MASTER_PORT", "8361"))
    num_nodes = int(os.getenv("WORLD_SIZE", "1"))
    node_rank = int(os.getenv("RANK", "0"))
    _local_rank = local_rank
    gpu = torch.cuda.is_available()
    if gpu:
        torch.cuda.set_device(local_rank)
    dist.init_process_group(
        "nccl" if gpu else "gloo", init_method=f"tcp://{address}:{port}",
        world_size=num_nodes * num_local_ranks, rank=node_rank * num_local_ranks + local_rank,
    )
    torch.set_default_dtype(torch.bfloat16)
    if gpu:
        torch.set_default_device(f"cuda:{local_rank}")
    init_seed(seed)
    return dist.get_rank(), dist.get_world_size(), dist.new_group(list(range(num_nodes * num_local_ranks)))
