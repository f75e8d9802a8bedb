"""The new tokens of one forward call of a loaded checkpoint (:class:`TokenBatch`):
sequences of different lengths packed into one ``[num_tokens, hidden]``
tensor, their positions, and where their latents go in the paged cache."""

from __future__ import annotations

import dataclasses

import torch

from dsinfra.models.kv_cache import PagedKVCache
from dsinfra.models.rope import Rotary


@dataclasses.dataclass
class TokenBatch:
    """Sequence ``i``'s new tokens are rows ``starts[i] .. starts[i] + lengths[i] - 1``.

    Without a cache: a full causal forward over each sequence. With one, the
    new tokens' latents are written at ``slots`` (block * block_size +
    offset); a prefill (``decoding`` false) starts each sequence from an empty
    cache, a decoding step (one token per sequence) attends through it.
    ``extra`` holds per-model caches that share the slots (V3.2's indexer keys).
    The tokens' RoPE angles are computed once (:meth:`angles`) and shared by the layers.
    """

    lengths: list[int]
    positions: torch.Tensor  # [num_tokens] int64
    cache: PagedKVCache | None = None
    slots: torch.Tensor | None = None  # [num_tokens] int64
    decoding: bool = False
    extra: dict = dataclasses.field(default_factory=dict)
    _angles: torch.Tensor | None = dataclasses.field(default=None, repr=False)

    @property
    def starts(self) -> list[int]:
        starts, total = [], 0
        for length in self.lengths:
            starts.append(total)
            total += length
        return starts

    @property
    def num_tokens(self) -> int:
        return sum(self.lengths)

    def angles(self, rotary: Rotary) -> torch.Tensor:
        """``rotary.angles(positions)``, computed on the first call."""
        if self._angles is None:
            self._angles = rotary.angles(self.positions)
        return self._angles

    def sequences(self) -> list[slice]:
        return [slice(start, start + length) for start, length in zip(self.starts, self.lengths)]


def positions_of(lengths: list[int], device: torch.device | str) -> torch.Tensor:
    """0 .. length - 1 for every sequence, packed: [sum(lengths)] int64."""
    if not lengths:
        return torch.zeros(0, dtype=torch.int64, device=device)
    return torch.cat([torch.arange(length, device=device) for length in lengths])


def slots_of(cache: PagedKVCache, sequence: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """The cache slots (block * block_size + offset) of the tokens at ``positions``
    of ``sequence`` (same shapes, int64)."""
    blocks = cache.block_table.long()[sequence, positions // cache.block_size]
    return blocks * cache.block_size + positions % cache.block_size


def prefill_batch(lengths: list[int], cache: PagedKVCache | None, device: torch.device | str) -> TokenBatch:
    """The prompts' tokens; with ``cache`` (empty, one row per prompt), room is made for them there."""
    positions = positions_of(lengths, device)
    if cache is None:
        return TokenBatch(lengths, positions)
    for row, length in enumerate(lengths):
        cache.rows(row, row + 1).advance(length)
    sequence = torch.repeat_interleave(torch.arange(len(lengths), device=device), torch.tensor(lengths, device=device))
    return TokenBatch(lengths, positions, cache, slots_of(cache, sequence, positions))


def decode_batch(cache: PagedKVCache) -> TokenBatch:
    """One new token for every sequence of ``cache``, room made for it there."""
    positions = cache.advance(1)[:, 0]
    sequence = torch.arange(positions.shape[0], device=positions.device)
    return TokenBatch([1] * positions.shape[0], positions, cache, slots_of(cache, sequence, positions), decoding=True)
