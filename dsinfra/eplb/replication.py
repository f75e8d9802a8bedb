"""Replication: how many replicas each expert gets, for many independent rows
(one row per layer, or per layer and node) at once.

A replica's load is its expert's load divided by the expert's replica count.
DeepSeek's rule gives each extra replica, one at a time, to the expert with the
largest load per replica: that minimises the largest replica, but not the
largest GPU. When the heavy experts of a node end up with a few more replicas
than the node has GPUs, two heavy replicas must share a GPU. Stopping the rule
earlier and giving the remaining replicas to the lightest experts (they only
split small loads further) leaves one heavy replica per GPU; which stop is best
depends on the packing, so the planner tries several (:func:`candidate_counts`).

Loads are float64 numpy arrays ``[rows, num_experts]``; counts are int64.
"""

from __future__ import annotations

import numpy as np

# How many stopping points of DeepSeek's rule the planner tries at most.
MAX_CANDIDATES = 9


def greedy_order(loads: np.ndarray, num_replicas: int) -> np.ndarray:
    """DeepSeek's replication rule, step by step: the expert that gets each of
    the ``num_replicas - num_experts`` extra replicas, in order. Each goes to the
    expert with the largest load per replica (equal: lowest index).

    loads: [rows, num_experts], float64 or float32 (loads per replica are
    divided in that dtype). Returns [rows, num_replicas - num_experts], int64.
    """
    rows, num_experts = loads.shape
    row = np.arange(rows)
    counts = np.ones((rows, num_experts), dtype=loads.dtype)
    per_replica = loads.copy()
    order = np.empty((rows, num_replicas - num_experts), dtype=np.int64)
    for step in range(num_replicas - num_experts):
        expert = per_replica.argmax(1)
        order[:, step] = expert
        counts[row, expert] += 1
        per_replica[row, expert] = loads[row, expert] / counts[row, expert]
    return order


def counts_after(order: np.ndarray, num_experts: int, steps: int) -> np.ndarray:
    """Replica counts after the first ``steps`` extra replicas of ``order``: [rows, num_experts], int64."""
    rows = order.shape[0]
    flat = (np.arange(rows)[:, None] * num_experts + order[:, :steps]).ravel()
    return 1 + np.bincount(flat, minlength=rows * num_experts).reshape(rows, num_experts)


def stopping_points(num_extra: int) -> list[int]:
    """The stops the planner tries: up to :data:`MAX_CANDIDATES`, evenly spread
    over ``0 .. num_extra``, ``num_extra`` (DeepSeek's rule run to the end) among them."""
    return sorted({round(i * num_extra / (MAX_CANDIDATES - 1)) for i in range(MAX_CANDIDATES)})


def candidate_counts(loads: np.ndarray, order: np.ndarray, stops: list[int]) -> np.ndarray:
    """For each stop ``s``: DeepSeek's first ``s`` extra replicas, then the rest
    one each to the lightest experts (lightest first; equal loads: lowest index;
    wrapping round if there are more left than experts).

    loads: [rows, num_experts], float64; order: from :func:`greedy_order`.
    Returns [len(stops), rows, num_experts], int64.
    """
    rows, num_experts = loads.shape
    num_extra = order.shape[1]
    lightness = np.argsort(np.argsort(loads, axis=1, kind="stable"), axis=1, kind="stable")  # 0: lightest
    candidates = []
    for stop in stops:
        left = num_extra - stop
        spread = left // num_experts + (lightness < left % num_experts)
        candidates.append(counts_after(order, num_experts, stop) + spread)
    return np.stack(candidates)


def replica_loads(loads: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """The load of every replica, experts in order and each expert's replicas
    together: [rows, num_replicas], float64 (every row has the same count sum)."""
    rows = loads.shape[0]
    return np.repeat((loads / counts).ravel(), counts.ravel()).reshape(rows, -1)


def replica_experts(counts: np.ndarray) -> np.ndarray:
    """The expert of every replica, in the order of :func:`replica_loads`: [rows, num_replicas], int64."""
    rows, num_experts = counts.shape
    experts = np.broadcast_to(np.arange(num_experts), counts.shape)
    return np.repeat(experts.ravel(), counts.ravel()).reshape(rows, -1)
