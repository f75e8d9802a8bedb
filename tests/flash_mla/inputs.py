"""Decoding inputs as FlashMLA's tests build them: shuffled block tables, NaN in
every cache slot no sequence uses, garbage in unused block-table entries."""

from __future__ import annotations

import dataclasses

import torch

from dsinfra.testing import generator, randn

UNUSED_BLOCK = 2147480000  # what upstream's test writes into unused block-table entries


@dataclasses.dataclass
class Inputs:
    q: torch.Tensor  # [batch, seq_len_q, num_heads_q, head_dim]
    k_cache: torch.Tensor  # [num_blocks, page_block_size, num_heads_k, head_dim]
    block_table: torch.Tensor  # [batch, max_blocks_per_seq] int32
    cache_seqlens: torch.Tensor  # [batch] int32
    head_dim_v: int

    @property
    def slots(self) -> list[torch.Tensor]:
        """Per sequence, the cache slots of its tokens, in order (on the CPU)."""
        page, table = self.k_cache.shape[1], self.block_table.cpu()
        out = []
        for b, length in enumerate(self.cache_seqlens.tolist()):
            tokens = torch.arange(length)
            out.append(table[b, tokens // page].long() * page + tokens % page)
        return out


def paged_inputs(
    lengths: list[int],
    *,
    num_heads_q: int = 16,
    num_heads_k: int = 1,
    head_dim: int = 576,
    head_dim_v: int = 512,
    seq_len_q: int = 1,
    page_block_size: int = 64,
    dtype: torch.dtype = torch.bfloat16,
    q_scale: float = 1.0,
    seed: int = 0,
) -> Inputs:
    """Sequences of ``lengths`` in a paged cache with shuffled blocks and two spare
    blocks (block 0 among them); unused slots hold NaN. ``q_scale`` > 1 makes the
    softmax peakier."""
    gen = generator(seed)
    blocks = [-(-length // page_block_size) for length in lengths]
    num_blocks = sum(blocks) + 2
    order = 1 + torch.randperm(num_blocks - 1, generator=gen)  # block 0 stays unused: slot 0 holds NaN
    table = torch.full((len(lengths), max(blocks) + 1), UNUSED_BLOCK, dtype=torch.int32)
    taken = 0
    for b, count in enumerate(blocks):
        table[b, :count] = order[taken:taken + count].int()
        taken += count
    k_cache = randn(num_blocks, page_block_size, num_heads_k, head_dim, seed=seed + 1, dtype=dtype)
    inputs = Inputs(
        q=(randn(len(lengths), seq_len_q, num_heads_q, head_dim, seed=seed + 2) * q_scale).to(dtype),
        k_cache=k_cache,
        block_table=table,
        cache_seqlens=torch.tensor(lengths, dtype=torch.int32),
        head_dim_v=head_dim_v,
    )
    used = torch.zeros(num_blocks * page_block_size, dtype=torch.bool)
    for slots in inputs.slots:
        used[slots] = True
    k_cache.view(num_blocks * page_block_size, -1)[~used] = float("nan")
    return inputs


def sparse_indices(inputs: Inputs, seq_len_q: int, topk: int, *, seed: int = 0) -> torch.Tensor:
    """[batch, seq_len_q, topk] int32 slots (on the CPU) of random tokens of each sequence
    (repeats allowed), about a fifth of them -1, and the last query of the
    first sequence with none at all."""
    gen = generator(seed)
    rows = []
    for slots in inputs.slots:
        picks = torch.randint(0, max(len(slots), 1), (seq_len_q, topk), generator=gen)
        chosen = slots[picks] if len(slots) else torch.full((seq_len_q, topk), -1)
        rows.append(chosen.masked_fill(torch.rand(seq_len_q, topk, generator=gen) < 0.2, -1))
    indices = torch.stack(rows).int()
    indices[0, -1] = -1
    return indices


def padded_blocks(cache: torch.Tensor, spare_tokens: int = 1) -> torch.Tensor:
    """``cache`` as a slice of a buffer with ``spare_tokens`` more tokens per block (blocks lie
    further apart than the page, as FlashMLA's tests make FP8 caches); the spare tokens hold NaN."""
    num_blocks, page = cache.shape[:2]
    buffer = torch.empty(num_blocks, page + spare_tokens, *cache.shape[2:], dtype=cache.dtype)
    buffer.view(torch.uint8).fill_(0xFF)  # NaN in bf16, fp16 and float8_e4m3fn alike
    buffer[:, :page] = cache
    return buffer[:, :page]


def sink_values(num_heads: int, *, seed: int) -> torch.Tensor:
    """[num_heads] float32 attention sinks: random, with +inf, -inf, a large and a very negative value."""
    sink = randn(num_heads, seed=seed)
    specials = torch.tensor([float("inf"), float("-inf"), 30.0, -30.0])
    sink[: min(num_heads, 4)] = specials[: min(num_heads, 4)]
    return sink
