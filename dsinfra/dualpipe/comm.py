"""What passes between pipeline stages: the shapes and dtype of the tensors
one stage sends the next (the same going back, as gradients).

Every stage boundary carries ``len(shapes)`` tensors of these shapes, all of
one dtype; the first stage's inputs and the last stage's outputs are free.
Call both setters, on every rank, before ``DualPipe.step()``::

    set_p2p_tensor_shapes([(micro_batch_size, seq_len, hidden_size)])
    set_p2p_tensor_dtype(torch.bfloat16)

Every ``step()`` first checks that all ranks of the pipeline set the same (and
call it with the same ``num_chunks``, all training or all forward-only): one
all-gather of a fixed-size digest, so that ranks that disagree all raise the
same ValueError instead of exchanging tensors of different sizes.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch
import torch.distributed as dist

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


def describe_step(num_chunks: object, training: bool) -> str:
    """What the ranks of a pipeline must agree on before a step, in words."""
    shapes = "not set" if TENSOR_SHAPES is None else str(TENSOR_SHAPES)
    dtype = "not set" if TENSOR_DTYPE is None else str(TENSOR_DTYPE).replace("torch.", "")
    return f"shapes {shapes}, dtype {dtype}, num_chunks {num_chunks!r}, {'training' if training else 'forward-only'}"


def gather_if_different(description: str, group: dist.ProcessGroup, device: torch.device) -> list[str] | None:
    """Every rank's ``description`` (by group rank) if they are not all the same, else None.

    The ranks first all-gather an 8-byte digest, so no rank waits on a message
    whose size another rank chose; only if the digests differ (then on every
    rank alike) do they gather the descriptions: their lengths, then the bytes
    padded to the longest."""
    world = dist.get_world_size(group)
    encoded = description.encode()
    digest = int.from_bytes(hashlib.blake2b(encoded, digest_size=8).digest(), "little", signed=True)
    digests = _all_gather(torch.tensor([digest], dtype=torch.int64, device=device), world, group)
    if len(set(digests.tolist())) == 1:
        return None
    lengths = _all_gather(torch.tensor([len(encoded)], dtype=torch.int64, device=device), world, group)
    padded = torch.zeros(int(lengths.max()), dtype=torch.uint8, device=device)
    padded[: len(encoded)] = torch.tensor(list(encoded), dtype=torch.uint8)
    texts = _all_gather(padded, world, group).view(world, -1).cpu()
    return [bytes(texts[rank, : int(lengths[rank])].tolist()).decode() for rank in range(world)]


def _all_gather(tensor: torch.Tensor, world: int, group: dist.ProcessGroup) -> torch.Tensor:
    parts = [torch.empty_like(tensor) for _ in range(world)]
    dist.all_gather(parts, tensor, group=group)
    return torch.cat(parts)
