"""Greedy generation with a loaded checkpoint through the paged latent cache
(:func:`generate`).

All prompts are prefilled in one forward (packed, each causal over itself,
its latents written into its rows of a :class:`~dsinfra.models.kv_cache.PagedKVCache`),
then every step decodes one token of every unfinished prompt at once through
FlashMLA: a batch of sequences of different lengths. A prompt stops at an end
token (kept in its output) or after ``max_new_tokens``.

On an expert-parallel group every rank calls :func:`generate` with its own
prompts (none is fine) and ``group``: the ranks then run the same number of
forwards, each MoE layer meeting the others in deep_ep's dispatch and combine.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist

from dsinfra.models.indexer import IndexerCache
from dsinfra.models.kv_cache import PagedKVCache
from dsinfra.models.token_batch import TokenBatch, decode_batch, positions_of, prefill_batch


@torch.no_grad()
def generate(
    model,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    *,
    eos_token_id: int | Sequence[int] | None = None,
    block_size: int = 64,
    group: dist.ProcessGroup | None = None,
    after_prefill: Callable[[], None] | None = None,
) -> list[list[int]]:
    """The greedy continuation of each prompt: the new token ids, one list per prompt.

    model: a :class:`~dsinfra.models.pretrained.PretrainedModel`.
    prompts: token-id lists, each non-empty, of any lengths.
    eos_token_id: the end tokens (default: the config's ``eos_token_id``; ``()``
        for none): a prompt whose last new token is one of them stops there.
    block_size: tokens per block of the paged cache.
    group: the expert-parallel group, when the model's experts are spread over one.
    after_prefill: called once between the prefill and the first decoding step
        (on a group: to move the experts by a plan made from the prefill's routing).
    """
    config = model.config
    prompts = [_checked_prompt(i, p, config.vocab_size) for i, p in enumerate(prompts)]
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an int >= 0; got {max_new_tokens!r}")
    eos = set(config.eos_token_ids if eos_token_id is None else ([eos_token_id] if isinstance(eos_token_id, int) else eos_token_id))
    lengths = [len(p) for p in prompts]
    capacity = max(lengths, default=0) + max_new_tokens
    if capacity > config.max_position_embeddings:
        raise ValueError(f"prompt and new tokens ({capacity}) exceed the model's max_position_embeddings ({config.max_position_embeddings})")
    outputs: list[list[int]] = [[] for _ in prompts]
    if max_new_tokens == 0:
        return outputs
    device = model.device
    cache = None
    if prompts:
        cache = PagedKVCache(config, config.num_hidden_layers, len(prompts), capacity, block_size=block_size, dtype=model.cache_dtype, device=device)
    batch = prefill_batch(lengths, cache, device)
    extra = _extra_caches(model, cache)
    batch.extra = extra
    tokens = torch.tensor([t for p in prompts for t in p], dtype=torch.int64, device=device)
    hidden = model.hidden_states(tokens, batch)
    last_rows = torch.tensor(lengths, dtype=torch.int64, device=device).cumsum(0) - 1
    next_tokens = model.logits(hidden[last_rows]).argmax(-1)
    running = [True] * len(prompts)
    for step in range(max_new_tokens):
        for i, token in enumerate(next_tokens.tolist()):
            if running[i]:
                outputs[i].append(token)
                running[i] = token not in eos
        if step == max_new_tokens - 1 or not _any_running(running, group, device):
            break
        if step == 0 and after_prefill is not None:
            after_prefill()
        batch = decode_batch(cache) if cache is not None else TokenBatch([], positions_of([], device), decoding=True)
        batch.extra = extra
        next_tokens = model.logits(model.hidden_states(next_tokens, batch)).argmax(-1)
    return outputs


def _checked_prompt(index: int, prompt: Sequence[int], vocab_size: int) -> list[int]:
    prompt = list(prompt)
    if not prompt:
        raise ValueError(f"prompts[{index}] is empty; every prompt needs at least one token")
    if any(isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab_size for t in prompt):
        raise ValueError(f"prompts[{index}] must hold token ids in [0, {vocab_size}); got {prompt}")
    return prompt


def _extra_caches(model, cache: PagedKVCache | None) -> dict:
    """The caches beside the latents: V3.2's index keys."""
    config = model.config
    if cache is None or not config.has_indexer:
        return {}
    return {"indexer": IndexerCache(cache, config.num_hidden_layers, config.index_head_dim, model.dtype, model.indexer_scoring)}


def _any_running(running: list[bool], group: dist.ProcessGroup | None, device: torch.device) -> bool:
    """Whether a prompt of this rank (or, with ``group``, of any rank) is unfinished."""
    if group is None:
        return any(running)
    flag = torch.tensor([int(any(running))], device=device if dist.get_backend(group) == "nccl" else "cpu")
    dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
    return bool(flag.item())
