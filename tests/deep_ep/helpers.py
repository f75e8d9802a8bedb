"""What the spawned ranks and the tests share: seeded per-rank inputs (the test
process regenerates every rank's inputs to compute the reference) and small
helpers the ranks use to call the Buffer and report back."""

from __future__ import annotations

import importlib

import torch

from dsinfra.testing import randn, topk_indices

HIDDEN = 256  # two FP8 scale groups
NUM_TOPK = 3
TOKENS = (7, 4, 12, 0)  # per rank of the world: rank 3 has no tokens
SUBGROUP_TOKENS = (5, 9, 1, 3)  # per rank, on 2-rank subgroups: rank 2 has a single token


def rank_inputs(rank: int, num_experts: int, *, seed: int = 0, dtype=torch.bfloat16, tokens=TOKENS):
    """x [num_tokens, HIDDEN], topk_idx [num_tokens, NUM_TOPK] int64 (-1 entries;
    the last expert is never chosen, so some rank has an empty expert),
    topk_weights [num_tokens, NUM_TOPK] float32, with ``tokens[rank]`` tokens."""
    tokens = tokens[rank]
    x = randn(tokens, HIDDEN, seed=seed + rank, dtype=dtype)
    topk_idx = topk_indices(tokens, num_experts - 1, NUM_TOPK, seed=seed + 100 + rank, skew=0.5, drop=0.2)
    topk_weights = randn(tokens, NUM_TOPK, seed=seed + 200 + rank)
    return x, topk_idx, topk_weights


def subgroup_inputs(rank: int, num_experts: int, *, dtype=torch.bfloat16):
    """The inputs of ``rank`` (a world rank) in the 2-rank subgroup tests."""
    return rank_inputs(rank, num_experts, seed=50, dtype=dtype, tokens=SUBGROUP_TOKENS)


def all_inputs(ranks, num_experts: int, inputs=rank_inputs, **kwargs):
    """Every listed rank's (x, topk_idx, topk_weights) from ``inputs``, as three lists."""
    xs, idxs, weights = zip(*(inputs(rank, num_experts, **kwargs) for rank in ranks))
    return list(xs), list(idxs), list(weights)


def layout_kwargs(buffer, topk_idx, num_experts) -> dict:
    """The layout arguments of Buffer.dispatch, from get_dispatch_layout."""
    per_rank, per_rdma_rank, per_expert, in_rank, _ = buffer.get_dispatch_layout(topk_idx, num_experts)
    return {
        "num_tokens_per_rank": per_rank,
        "num_tokens_per_rdma_rank": per_rdma_rank,
        "num_tokens_per_expert": per_expert,
        "is_token_in_rank": in_rank,
    }


def raised(fn) -> tuple[str, str] | None:
    """(exception type, message) of what ``fn()`` raises, or None."""
    try:
        fn()
    except Exception as error:  # noqa: BLE001 - the tests inspect whatever came
        return type(error).__name__, str(error)
    return None


def check_errors(got: dict, expected: dict) -> None:
    """Each ``got[name]`` (from :func:`raised`) is an exception of the expected
    kind whose message contains the expected text."""
    for name, (kind, text) in expected.items():
        error = got[name]
        assert error is not None and error[0] == kind and text in error[1], (name, error)


def dispatch_and_wait(buffer, x, **kwargs) -> dict:
    """Buffer.dispatch, waited for, as a dict; FP8 comes back as its bytes
    (float8 tensors do not pickle) with the received dtypes alongside."""
    recv_x, recv_topk_idx, recv_topk_weights, counts, handle, event = buffer.dispatch(x, **kwargs)
    event.current_stream_wait()
    dtypes = [t.dtype for t in recv_x] if isinstance(recv_x, tuple) else [recv_x.dtype]
    if isinstance(recv_x, tuple):
        recv_x = (recv_x[0].view(torch.uint8), recv_x[1])
    return {
        "dtypes": dtypes,
        "recv_x": recv_x,
        "recv_topk_idx": recv_topk_idx,
        "recv_topk_weights": recv_topk_weights,
        "counts": counts,
        "handle": handle,
    }


NUM_RANKS = 4
WORLD_EXPERTS = 8  # experts of the normal-mode tests on the 4-rank world
# Test modules whose ``_run_ranks(rank, world_size, group)`` runs in the shared
# spawn, in this order (the failure part breaks a subgroup, so it runs last).
PARTS = ("intranode", "hierarchical", "low_latency", "autograd", "default_dtype", "failure")


def run_parts(rank: int, world_size: int, group) -> dict:
    """Every part's rank side in one spawn: start-up, not the work, dominates
    a spawn's cost, so the parts share one."""
    return {part: importlib.import_module(f"tests.deep_ep.test_{part}")._run_ranks(rank, world_size, group) for part in PARTS}
