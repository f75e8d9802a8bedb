"""A paged cache of MLA latents, in FlashMLA's layout.

Per layer, ``blocks[layer]`` is [num_blocks, block_size, 1, kv_lora_rank +
qk_rope_head_dim]: one KV head whose first kv_lora_rank channels are also the
values. Sequence ``b``'s token ``t`` lives in block ``block_table[b, t //
block_size]`` at offset ``t % block_size``. Blocks are handed out in a shuffled
order, as a serving engine's allocator would, and start filled with NaN: a
kernel that read a slot past a sequence's length would poison the result.
"""

from __future__ import annotations

import torch

from dsinfra.models.config import ModelArgs


class PagedKVCache:
    def __init__(
        self,
        args: ModelArgs,
        num_layers: int,
        batch: int,
        max_len: int,
        *,
        block_size: int = 64,
        dtype: torch.dtype = torch.bfloat16,
        device: torch.device | str = "cpu",
        seed: int = 0,
    ):
        if max_len > args.max_seq_len:
            raise ValueError(f"max_len ({max_len}) must be <= the model's max_seq_len ({args.max_seq_len})")
        self.block_size = block_size
        self.dtype = dtype
        blocks_per_seq = -(-max_len // block_size)
        num_blocks = batch * blocks_per_seq
        width = args.kv_lora_rank + args.qk_rope_head_dim
        self.blocks = [
            torch.full((num_blocks, block_size, 1, width), float("nan"), dtype=dtype, device=device)
            for _ in range(num_layers)
        ]
        order = torch.randperm(num_blocks, generator=torch.Generator().manual_seed(seed))
        self.block_table = order.view(batch, blocks_per_seq).to(device=device, dtype=torch.int32)
        self.seqlens = torch.zeros(batch, dtype=torch.int32, device=device)
        self.capacity = blocks_per_seq * block_size
        self._metadata: dict[tuple[int, int | None], tuple[torch.Tensor, torch.Tensor]] = {}
        self._num_new = 0

    def rows(self, start: int, stop: int) -> PagedKVCache:
        """A view of sequences ``start .. stop-1``: it shares the blocks, and
        advancing it advances them here too."""
        view = object.__new__(PagedKVCache)
        view.__dict__.update(self.__dict__)
        view.block_table = self.block_table[start:stop]
        view.seqlens = self.seqlens[start:stop]
        view._metadata = {}
        return view

    def advance(self, num_new: int) -> torch.Tensor:
        """Make room for ``num_new`` more tokens in every sequence; returns their
        positions, [batch, num_new] int64."""
        if int(self.seqlens.max()) + num_new > self.capacity:
            raise ValueError(f"the cache holds {self.capacity} tokens per sequence; cannot add {num_new} more")
        self.seqlens += num_new
        self._num_new = num_new
        self._metadata.clear()
        return self.seqlens.long().unsqueeze(1) - num_new + torch.arange(num_new, device=self.seqlens.device)

    def write(self, layer: int, latents: torch.Tensor) -> None:
        """Store ``latents [batch, num_new, width]`` at the positions the last
        :meth:`advance` made."""
        num_new = latents.shape[1]
        positions = self.seqlens.long().unsqueeze(1) - num_new + torch.arange(num_new, device=latents.device)
        blocks = self.block_table.long().gather(1, positions // self.block_size)
        self.blocks[layer][blocks, positions % self.block_size, 0] = latents.to(self.dtype)

    def metadata(self, num_heads: int, topk: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """FlashMLA's split plan for the current lengths (with ``topk``: for
        sparse attention over that many indices a query), computed once per
        step and shared by every layer, as upstream does."""
        key = (num_heads, topk)
        if key not in self._metadata:
            from dsinfra import flash_mla

            # query rows per KV head: heads x new tokens (one KV head in MLA)
            self._metadata[key] = flash_mla.get_mla_metadata(
                self.seqlens, num_heads * self._num_new, 1, num_heads_q=num_heads, topk=topk
            )
        return self._metadata[key]
