"""spawn returns every rank's result; it surfaces an exception, a dead rank and a
hung rank, each with the rank's number; and it leaves no process behind."""

import os
import signal
import time

import pytest
import torch
import torch.distributed as dist

from dsinfra.testing import SpawnError, spawn


def _record_pid(directory, rank):
    with open(os.path.join(directory, f"rank{rank}.pid"), "w") as f:
        f.write(str(os.getpid()))


def _assert_all_gone(directory, world_size):
    pids = [int(open(os.path.join(directory, f"rank{r}.pid")).read()) for r in range(world_size)]
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def _all_reduce(rank, world_size, group, directory):
    _record_pid(directory, rank)
    x = torch.tensor([float(rank + 1)])
    dist.all_reduce(x, group=group)
    return rank, world_size, x.item(), torch.get_num_threads()


def _raise_on_rank_1(rank, world_size, group, directory):
    _record_pid(directory, rank)
    if rank == 1:
        raise KeyError("boom in rank one")
    dist.barrier(group=group)  # rank 0 waits here for a peer that never comes


def _die_on_rank_2(rank, world_size, group, directory):
    _record_pid(directory, rank)
    if rank == 2:
        os.kill(os.getpid(), signal.SIGKILL)
    dist.barrier(group=group)


def _hang_on_rank_1(rank, world_size, group, directory):
    _record_pid(directory, rank)
    if rank == 1:
        time.sleep(3600)


def test_results_come_back_in_rank_order(tmp_path):
    results = spawn(_all_reduce, 3, str(tmp_path))
    assert [r[:3] for r in results] == [(rank, 3, 6.0) for rank in range(3)]
    assert all(r[3] >= 1 for r in results)
    _assert_all_gone(tmp_path, 3)


def test_an_exception_names_its_rank_with_the_traceback(tmp_path):
    start = time.monotonic()
    with pytest.raises(SpawnError, match="rank 1 raised") as error:
        spawn(_raise_on_rank_1, 2, str(tmp_path), timeout=60)
    assert error.value.rank == 1
    assert "KeyError: 'boom in rank one'" in str(error.value)
    assert "_raise_on_rank_1" in str(error.value)  # the rank's own traceback
    assert time.monotonic() - start < 30  # does not wait for rank 0's barrier to time out
    _assert_all_gone(tmp_path, 2)


def test_a_dead_rank_is_reported(tmp_path):
    with pytest.raises(SpawnError, match=r"^rank 2 died without reporting \(exit code -9\)") as error:
        spawn(_die_on_rank_2, 3, str(tmp_path), timeout=60)
    assert error.value.rank == 2  # named first, before the peers its death broke
    _assert_all_gone(tmp_path, 3)


def test_a_hung_rank_times_out(tmp_path):
    start = time.monotonic()
    with pytest.raises(SpawnError, match=r"ranks? (0, )?1 did not finish within 8 s") as error:
        spawn(_hang_on_rank_1, 2, str(tmp_path), timeout=8)
    # rank 0 finishes at once, but on a loaded machine even starting may take 8 s
    assert 1 in error.value.ranks
    assert time.monotonic() - start < 30
    _assert_all_gone(tmp_path, 2)


def test_bad_arguments():
    with pytest.raises(ValueError, match="world_size"):
        spawn(_all_reduce, 0, "")
    with pytest.raises(ValueError, match="timeout"):
        spawn(_all_reduce, 1, "", timeout=0)
