"""Run a function on several ranks, each in its own process, the way the tests
and the multi-process benchmarks need it.

    def check(rank, world_size, group, scale):
        x = torch.full((4,), float(rank + 1))
        dist.all_reduce(x, group=group)
        return x.tolist()

    results = spawn(check, 4, 2.0)   # [result of rank 0, result of rank 1, ...]

The ranks meet at a TCP store that this process serves on a free port of
127.0.0.1, so no port is ever guessed. Whatever goes wrong surfaces here as a
:class:`SpawnError` naming the rank: an exception (with that rank's
traceback), a rank that dies without reporting (with its exit code), or ranks
that do not finish within ``timeout`` seconds. On every way out, every process
still running is killed and reaped: none is left behind.
"""

from __future__ import annotations

import datetime
import multiprocessing
import os
import pickle
import queue
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

_POLL_SECONDS = 0.05
_SETTLE_SECONDS = 1.0


class SpawnError(RuntimeError):
    """A rank raised, died or hung. ``ranks`` lists the ranks concerned, the
    likeliest cause first (a rank that died before ranks that raised); ``rank``
    is the first of them."""

    def __init__(self, message: str, ranks: list[int]):
        super().__init__(message)
        self.ranks = ranks
        self.rank = ranks[0]


def _worker(
    rank: int,
    world_size: int,
    port: int,
    backend: str,
    timeout: float,
    threads: int,
    fn: Callable[..., Any],
    args: tuple,
    results: multiprocessing.Queue,
) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    try:
        torch.set_num_threads(threads)
        if backend == "nccl":
            torch.cuda.set_device(rank % torch.cuda.device_count())
        store = dist.TCPStore("127.0.0.1", port, world_size, is_master=False, timeout=datetime.timedelta(seconds=timeout))
        dist.init_process_group(
            backend, store=store, rank=rank, world_size=world_size, timeout=datetime.timedelta(seconds=timeout)
        )
        try:
            value = fn(rank, world_size, dist.group.WORLD, *args)
        finally:
            dist.destroy_process_group()
        results.put((rank, True, pickle.dumps(value)))
    except BaseException:  # report everything, KeyboardInterrupt and SystemExit included
        results.put((rank, False, traceback.format_exc()))


def spawn(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    backend: str = "gloo",
    timeout: float = 120.0,
    threads_per_rank: int | None = None,
) -> list[Any]:
    """Run ``fn(rank, world_size, group, *args)`` on ``world_size`` ranks, each in
    a fresh process, and return the ranks' return values in rank order.

    fn: a module-level function (it is pickled into the processes); its return
        value must pickle too.
    backend: ``gloo`` (CPU) or ``nccl`` (one GPU per rank, ``rank % device_count``).
    timeout: seconds for the whole run; also the process group's timeout, so a
        collective waiting on a dead peer gives up too.
    threads_per_rank: torch intra-op threads in each rank; by default the CPU
        cores are shared out so the ranks do not oversubscribe them.

    Raises SpawnError naming the rank that raised (with its traceback), died
    (with its exit code) or did not finish in time.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1; got {world_size}")
    if timeout <= 0:
        raise ValueError(f"timeout must be > 0; got {timeout}")
    if threads_per_rank is None:
        threads_per_rank = max(1, (os.cpu_count() or 1) // world_size)

    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    store = dist.TCPStore(
        "127.0.0.1", 0, world_size + 1, is_master=True, wait_for_workers=False, timeout=datetime.timedelta(seconds=timeout)
    )
    processes = [
        context.Process(
            target=_worker,
            args=(rank, world_size, store.port, backend, timeout, threads_per_rank, fn, args, results),
            name=f"dsinfra-rank-{rank}",
            daemon=True,
        )
        for rank in range(world_size)
    ]
    values: dict[int, Any] = {}
    raised: dict[int, str] = {}  # rank -> its traceback
    died: dict[int, int] = {}  # rank -> exit code
    try:
        for process in processes:
            process.start()
        deadline = time.monotonic() + timeout
        settle = None  # after a first failure, a moment to see whether a peer's death caused it
        while len(values) + len(raised) + len(died) < world_size:
            now = time.monotonic()
            if (settle is not None and now > settle) or now > deadline:
                break
            # Note the dead first, then take what is in flight: a rank that
            # reported just before exiting has its report in the queue by now.
            dead = [r for r, p in enumerate(processes) if not p.is_alive() and r not in values and r not in raised]
            try:
                while True:
                    rank, ok, payload = results.get(timeout=_POLL_SECONDS)
                    if ok:
                        values[rank] = pickle.loads(payload)
                    else:
                        raised[rank] = payload
            except queue.Empty:
                pass
            for rank in dead:
                if rank not in values and rank not in raised:
                    died[rank] = processes[rank].exitcode
            if (raised or died) and settle is None:
                settle = time.monotonic() + _SETTLE_SECONDS
        if raised or died:
            # A death is the likelier cause of its peers' errors: it goes first.
            lines = [f"rank {r} died without reporting (exit code {code})" for r, code in sorted(died.items())]
            lines += [f"rank {r} raised:\n{tb}" for r, tb in raised.items()]
            raise SpawnError("\n".join(lines), sorted(died) + list(raised))
        if len(values) < world_size:
            missing = [r for r in range(world_size) if r not in values]
            plural = "s" if len(missing) > 1 else ""
            raise SpawnError(f"rank{plural} {', '.join(map(str, missing))} did not finish within {timeout:g} s", missing)
        for process in processes:
            process.join(timeout=max(1.0, deadline - time.monotonic()))
        return [values[rank] for rank in range(world_size)]
    finally:
        _reap(processes)
        results.close()
        results.join_thread()


def _reap(processes: list) -> None:
    """Kill and join every process still alive."""
    for process in processes:
        if process.is_alive():
            process.kill()
    for process in processes:
        if process.pid is not None:
            process.join(timeout=10)
