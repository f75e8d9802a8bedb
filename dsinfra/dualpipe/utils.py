"""Helpers of the pipeline runtime, with upstream's names: backward over
chosen roots, the splitting of a batch into micro-batches and back. (Also
re-exports :class:`WeightGradStore`, as ``dualpipe.utils`` does.)"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.autograd import Variable

from dsinfra.dualpipe.zero_bubble import WeightGradStore

__all__ = ["WeightGradStore", "gather", "run_backward", "scatter"]


def run_backward(tensors: Sequence[torch.Tensor], grad_tensors: Sequence[torch.Tensor]) -> None:
    """Backpropagate ``grad_tensors`` from ``tensors`` and accumulate into the
    leaves' ``.grad``, as ``torch.autograd.backward`` does, but without
    comparing each root's shape with its gradient's: a pipeline stage frees
    the data of outputs it has sent on, and only their graph is needed."""
    Variable._execution_engine.run_backward(
        tuple(tensors), tuple(grad_tensors), keep_graph=False, create_graph=False, allow_unreachable=True, accumulate_grad=True
    )


def scatter(
    inputs: Sequence[torch.Tensor | None], chunks: int, dim: int, *, name: str = "inputs"
) -> list[tuple[torch.Tensor | None, ...]]:
    """Split each tensor of ``inputs`` into ``chunks`` equal micro-batches along
    ``dim``; None entries stay None in every micro-batch. Returns one tuple per
    micro-batch. Raises ValueError when a tensor does not divide evenly."""
    for index, tensor in enumerate(inputs):
        if tensor is None:
            continue
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"{name}[{index}] must be a torch.Tensor or None; got {type(tensor).__name__}")
        if tensor.dim() <= dim:
            raise ValueError(f"{name}[{index}] has shape {list(tensor.shape)}, with no batch dimension {dim}")
        if tensor.shape[dim] % chunks:
            raise ValueError(
                f"{name}[{index}] has {tensor.shape[dim]} samples along dimension {dim}, "
                f"which do not divide into {chunks} micro-batches"
            )
    split = [[None] * chunks if t is None else t.chunk(chunks, dim) for t in inputs]
    return [tuple(parts[i] for parts in split) for i in range(chunks)]


def gather(micro_outputs: Sequence[Sequence[torch.Tensor]], dim: int) -> tuple[torch.Tensor, ...]:
    """Concatenate micro-batch outputs (one sequence of tensors per micro-batch)
    along ``dim``, position by position."""
    return tuple(torch.cat(parts, dim) for parts in zip(*micro_outputs))
