"""What passes between pipeline stages: the shapes and dtype of the tensors
one stage sends the next (the same going back, as gradients).

Every stage boundary carries ``len(shapes)`` tensors of these shapes, all of
one dtype; the first stage's inputs and the last stage's outputs are free.
Call both setters, on every rank, before ``DualPipe.step()``::

    set_p2p_tensor_shapes([(micro_batch_size, seq_len, hidden_size)])
    set_p2p_tensor_dtype(torch.bfloat16)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

TENSOR_SHAPES: list[tuple[int, ...]] | None = None
TENSOR_DTYPE: torch.dtype | None = None


def set_p2p_tensor_shapes(shapes: Sequence[Sequence[int]]) -> None:
    """shapes: one shape per tensor a stage passes on, e.g. ``[(micro_batch, seq, hidden)]``."""
    global TENSOR_SHAPES
    if isinstance(shapes, (str, bytes)) or not isinstance(shapes, Sequence) or not shapes:
        raise ValueError(f"shapes must be a non-empty list of shapes; got {shapes!r}")
    checked = []
    for index, shape in enumerate(shapes):
        if not isinstance(shape, (Sequence, torch.Size)) or not all(
            isinstance(size, int) and not isinstance(size, bool) and size >= 0 for size in shape
        ):
            raise ValueError(f"shapes[{index}] must be a tuple of sizes >= 0; got {shape!r}")
        checked.append(tuple(shape))
    TENSOR_SHAPES = checked


def set_p2p_tensor_dtype(dtype: torch.dtype) -> None:
    """dtype: of every tensor a stage passes on (activations and their gradients)."""
    global TENSOR_DTYPE
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype must be a torch.dtype; got {type(dtype).__name__}")
    TENSOR_DTYPE = dtype


def check_configured() -> None:
    if TENSOR_SHAPES is None or TENSOR_DTYPE is None:
        raise ValueError(
            "call set_p2p_tensor_shapes(...) and set_p2p_tensor_dtype(...) before step(): "
            "the pipeline needs the shapes and dtype of the tensors its stages pass on"
        )


def empty_buffers(device: torch.device, requires_grad: bool) -> list[torch.Tensor]:
    """Fresh tensors to receive one boundary's worth of data into."""
    check_configured()
    return [torch.empty(shape, dtype=TENSOR_DTYPE, device=device, requires_grad=requires_grad) for shape in TENSOR_SHAPES]


def check_outputs(name: str, tensors: Sequence[torch.Tensor]) -> None:
    """Check that ``tensors`` match the configured shapes and dtype."""
    check_configured()
    shapes = [tuple(t.shape) if isinstance(t, torch.Tensor) else None for t in tensors]
    if shapes != TENSOR_SHAPES or any(t.dtype != TENSOR_DTYPE for t in tensors):
        got = [f"{list(t.shape)} {str(t.dtype).replace('torch.', '')}" if isinstance(t, torch.Tensor) else type(t).__name__ for t in tensors]
        want = [f"{list(s)} {str(TENSOR_DTYPE).replace('torch.', '')}" for s in TENSOR_SHAPES]
        raise ValueError(
            f"{name} must match set_p2p_tensor_shapes/set_p2p_tensor_dtype ({', '.join(want)}); got {', '.join(got)}"
        )
