"""Test and benchmark helpers: multi-process runs, numerics, seeded data."""

from dsinfra.testing.data import generator, randn, seq_lengths, skewed_loads, topk_indices
from dsinfra.testing.numerics import calc_diff, count_bytes
from dsinfra.testing.spawn import SpawnError, spawn

__all__ = [
    "SpawnError",
    "calc_diff",
    "count_bytes",
    "generator",
    "randn",
    "seq_lengths",
    "skewed_loads",
    "topk_indices",
    "spawn",
]
