"""Pipeline ranks that set different p2p shapes or dtypes, or step with a
different num_chunks, all raise the same ValueError before any tensor moves:
no rank aborts inside gloo, none reads a buffer only partly received."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dsinfra.dualpipe import DualPipe, DualPipeV, comm, set_p2p_tensor_dtype, set_p2p_tensor_shapes
from dsinfra.testing import spawn

HIDDEN = 4


def _step(pipe, rank, num_chunks, shapes, dtype):
    comm.TENSOR_SHAPES = comm.TENSOR_DTYPE = None
    if shapes is not None:
        set_p2p_tensor_shapes(shapes)
    if dtype is not None:
        set_p2p_tensor_dtype(dtype)
    dualpipe = isinstance(pipe, DualPipe)
    x = torch.ones(num_chunks if dualpipe else 2 * num_chunks, HIDDEN)  # micro-batches of 2, half per end for DualPipe
    first = rank == 0 or dualpipe and rank == pipe.num_ranks - 1
    with torch.no_grad():
        pipe.step(x if first else None, num_chunks=num_chunks)


def disagree(rank, world_size, group):
    """Both pipelines through every case; returns each case's error message."""
    torch.manual_seed(0)
    modules = [nn.Linear(HIDDEN, HIDDEN), nn.Linear(HIDDEN, HIDDEN)]
    return [_disagree(kind(modules, process_group=group), rank, rank == world_size - 1) for kind in (DualPipeV, DualPipe)]


def _disagree(pipe, rank, last):
    """Each case: this rank's (num_chunks, shapes, dtype)."""
    cases = [
        (4, [(2, HIDDEN * 2 if last else HIDDEN)], torch.float32),  # the receiver's buffer larger on one rank
        (4, [(2, HIDDEN)], torch.float64 if last else torch.float32),
        (4, None if last else [(2, HIDDEN)], torch.float32),  # one rank never set its shapes
        (6 if last else 4, [(2, HIDDEN)], torch.float32),
    ]
    messages = []
    for num_chunks, shapes, dtype in cases:
        with pytest.raises(ValueError) as error:
            _step(pipe, rank, num_chunks, shapes, dtype)
        messages.append(str(error.value))
    _step(pipe, rank, 4, [(2, HIDDEN)], torch.float32)  # agreeing ranks step as before
    return messages


def test_ranks_that_disagree_all_raise_the_same_error():
    messages = spawn(disagree, 2, timeout=60)
    assert messages[0] == messages[1]
    dualpipev, dualpipe = messages[0]
    assert dualpipe == dualpipev
    larger, dtype, unset, chunks = dualpipe
    assert "every pipeline rank must call set_p2p_tensor_shapes and set_p2p_tensor_dtype with the same values" in larger
    assert "rank 0: shapes [(2, 4)], dtype float32" in larger and "rank 1: shapes [(2, 8)], dtype float32" in larger
    assert "rank 0: shapes [(2, 4)], dtype float32" in dtype and "rank 1: shapes [(2, 4)], dtype float64" in dtype
    assert "rank 1: shapes not set, dtype float32" in unset
    assert "num_chunks 4" in chunks and "rank 1: shapes [(2, 4)], dtype float32, num_chunks 6" in chunks
