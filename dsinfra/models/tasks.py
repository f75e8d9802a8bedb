"""A seeded synthetic task a small model can learn: sorting token sequences."""

from __future__ import annotations

import torch

IGNORE = -100  # targets that carry no loss


class SortTask:
    """Sequences ``x_1 .. x_n SEP sorted(x)``: the model reads n random tokens
    and must write them in ascending order after the separator.

    ``batch(step)`` gives tokens [batch, 2n + 1] int64 and targets of the same
    shape: the next token where it is part of the sorted answer, IGNORE
    elsewhere. The same (seed, step) always gives the same batch.
    """

    def __init__(self, vocab_size: int, length: int, batch_size: int, seed: int = 0):
        if vocab_size < 3:
            raise ValueError(f"vocab_size must be >= 3; got {vocab_size}")
        self.num_values = vocab_size - 1  # the last token is the separator
        self.separator = vocab_size - 1
        self.length = length
        self.batch_size = batch_size
        self.seed = seed

    @property
    def seq_len(self) -> int:
        return 2 * self.length + 1

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        values = torch.randint(0, self.num_values, (self.batch_size, self.length), generator=gen)
        separator = torch.full((self.batch_size, 1), self.separator)
        tokens = torch.cat([values, separator, values.sort(dim=1).values], dim=1)
        targets = torch.full_like(tokens, IGNORE)
        targets[:, self.length : -1] = tokens[:, self.length + 1 :]
        return tokens, targets

    def requests(self, answered: list[int], step: int = 10**6) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Requests for serving, as (prompt, expected continuation) pairs.

        Request ``i`` is a fresh unsorted sequence, the separator, and the first
        ``answered[i]`` tokens of its sorted answer already written: prompts of
        ``length + 1 + answered[i]`` tokens, all of them like the training data,
        whose continuation is the rest of the sorted answer.
        """
        if any(not 0 <= a < self.length for a in answered):
            raise ValueError(f"answered must hold values in [0, {self.length}); got {answered}")
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        pairs = []
        for a in answered:
            values = torch.randint(0, self.num_values, (self.length,), generator=gen)
            ordered = values.sort().values
            prompt = torch.cat([values, torch.tensor([self.separator]), ordered[:a]])
            pairs.append((prompt, ordered[a:]))
        return pairs
