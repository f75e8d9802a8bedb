"""Sharing a host's cores between the ranks of a group.

A Buffer's calls do their copies, casts and sums with PyTorch's intra-op
(OpenMP) threads. When the ranks on one host together ask for more threads
than it has cores, as ``torch.multiprocessing.spawn`` and most hand-written
launchers do by leaving every rank at torch's default, each parallel region
ends at a barrier that waits for threads the other ranks have pushed off the
cores, and a handful of regions per call cost more than the work itself (a
combine of 1,024 tokens on 4 ranks sharing 2 cores ran 25x slower).

The remedy is the fair share: a Buffer learns at construction how many
threads the ranks on its host use, and when they oversubscribe the cores, its
calls run their own work with ``cores // ranks on the host`` threads (at least
one), restoring torch's setting for the calling thread afterwards. Nothing
changes where the cores suffice.
"""

from __future__ import annotations

import contextlib
import os
import socket
import zlib
from collections.abc import Iterator

import torch


def host_id() -> int:
    """A number that is the same for every process of this host (a CRC of its name)."""
    return zlib.crc32(socket.gethostname().encode())


def num_cores() -> int:
    """The cores this process may run on."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def fair_share(my_host: int, hosts: list[int], threads: list[int], cores: int) -> int | None:
    """The thread count for this rank's work when the ranks on its host
    (``hosts[r] == my_host``, each using ``threads[r]``) oversubscribe its
    ``cores``; None when they do not."""
    mine = [count for host, count in zip(hosts, threads) if host == my_host]
    if sum(mine) <= cores:
        return None
    return max(1, cores // len(mine))


@contextlib.contextmanager
def at_most(num_threads: int | None) -> Iterator[None]:
    """Run the body with at most ``num_threads`` intra-op threads in this
    thread (no limit with None), then restore the previous count."""
    before = torch.get_num_threads()
    if num_threads is None or before <= num_threads:
        yield
        return
    torch.set_num_threads(num_threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)
