"""A rank that fails makes the others fail within the group's timeout instead
of hanging: on a 2-rank group with a 1 s timeout, rank 1 fails in its own
code and never joins the transfer; rank 0, waiting in the transfer, raises
soon after (ranks 2 and 3 only take part in creating the group). Argument
errors, which every rank learns of, are tested with the calls they concern."""

from __future__ import annotations

import datetime
import time

import pytest
import torch.distributed as dist

from dsinfra.deep_ep import Buffer
from tests.deep_ep.helpers import raised, rank_inputs

TIMEOUT_S, NUM_EXPERTS = 1.0, 8


def _run_ranks(rank, world_size, group):
    ep_group = dist.new_group([0, 1], timeout=datetime.timedelta(seconds=TIMEOUT_S))
    if rank >= 2:
        return None
    buffer = Buffer(ep_group, 0, int(1e8), low_latency_mode=True)
    x, topk_idx, _ = rank_inputs(rank, NUM_EXPERTS)  # ranks 0 and 1 have tokens
    if rank == 1:
        time.sleep(3 * TIMEOUT_S)  # alive, but never joins
        return None, None
    start = time.monotonic()
    error = raised(lambda: buffer.low_latency_dispatch(x, topk_idx, 16, NUM_EXPERTS))
    return error, time.monotonic() - start


@pytest.fixture(scope="module")
def ranks(all_ranks):
    return [result["failure"] for result in all_ranks]


def test_a_failed_rank_makes_the_others_fail_within_the_timeout(ranks):
    (error_0, waited), _ = ranks[:2]
    assert error_0 is not None and error_0[0] == "RuntimeError", error_0
    assert "timed out" in error_0[1].lower(), error_0
    assert waited < 2.5 * TIMEOUT_S
