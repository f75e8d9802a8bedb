"""DeepSeek-V3.2's lightning indexer (:class:`Indexer`): which earlier tokens
each query attends to (DeepSeek Sparse Attention).

Each token gets one index key ``k = LayerNorm(wk x)`` and ``index_n_heads``
index queries ``q = wq_b(q_lora)`` (RoPE on the first ``qk_rope_head_dim``
channels, rotating halves), and each query token scores every key it may see::

    score[s, t] = sum_h w[s, h] * relu(q[s, h] . k[t] / sqrt(index_head_dim)),   w = weights_proj(x) / sqrt(index_n_heads)

The ``index_topk`` best keys (all of them, for shorter sequences) are the ones
its attention reads. Two ways to score:

- "bf16" (the default for bf16, fp16 and fp32 checkpoints): float32 math on the
  keys as the model's dtype holds them, as transformers computes it, so the
  same keys are chosen.
- "fp8" (the default for FP8 checkpoints): as DeepSeek's inference does, q and
  k are rotated by a Hadamard transform (orthogonal: the scores do not change,
  outliers spread out), cast to FP8 per token and head, and scored by
  :func:`dsinfra.deep_gemm.fp8_mqa_logits` (prefill) and
  :func:`dsinfra.deep_gemm.fp8_paged_mqa_logits` (decoding, over FP8 keys
  cached in DeepGEMM's paged layout). Needs index_head_dim a power of two, at
  most 128 (one scale per token).

Index keys are cached beside the latents (:class:`IndexerCache`, same slots).
"""

from __future__ import annotations

import functools
import math

import torch
from torch import nn

from dsinfra.fp8 import per_token_cast_to_fp8
from dsinfra.models.checkpoint_config import CheckpointConfig
from dsinfra.models.kv_cache import PagedKVCache
from dsinfra.models.rope import rotate
from dsinfra.models.token_batch import TokenBatch, slots_of

SCORINGS = ("bf16", "fp8")


class IndexerCache:
    """The index keys of every cached token, per layer, at the latents' slots of ``cache``.

    "bf16" scoring: ``keys[layer]`` [num_blocks * block_size, index_head_dim] in
    ``dtype``. "fp8" scoring: ``keys[layer]`` [num_blocks, block_size, 1,
    index_head_dim + 4] uint8, DeepGEMM's paged layout: each block holds its
    tokens' FP8 values, then their float32 scales.
    """

    def __init__(self, cache: PagedKVCache, num_layers: int, index_head_dim: int, dtype: torch.dtype, scoring: str):
        num_blocks, block_size = cache.block_table.numel(), cache.block_size
        device = cache.block_table.device
        self.scoring = scoring
        self.block_size, self.dim = block_size, index_head_dim
        if scoring == "fp8":
            shape, dtype = (num_blocks, block_size, 1, index_head_dim + 4), torch.uint8
            self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        else:
            shape = (num_blocks * block_size, index_head_dim)
            self.keys = [torch.full(shape, float("nan"), dtype=dtype, device=device) for _ in range(num_layers)]

    def write(self, layer: int, slots: torch.Tensor, keys) -> None:
        """Store ``keys`` ([tokens, dim] float; for "fp8", an FP8 pair with
        scales [tokens]) at ``slots``."""
        if self.scoring != "fp8":
            self.keys[layer][slots] = keys.to(self.keys[layer].dtype)
            return
        values, scales = keys
        blocks = self.keys[layer].view(self.keys[layer].shape[0], -1)
        block, offset = slots // self.block_size, slots % self.block_size
        split = self.block_size * self.dim
        blocks[:, :split].view(-1, self.block_size, self.dim)[block, offset] = values.view(torch.uint8)
        blocks[:, split:].view(torch.float32)[block, offset] = scales


class Indexer(nn.Module):
    """``wq_b``, ``wk``, ``k_norm`` (a LayerNorm with bias) and ``weights_proj``
    of one layer, with transformers' names; ``scoring``: "bf16" or "fp8"."""

    def __init__(self, config: CheckpointConfig, layer: int, modules: dict[str, nn.Module], scoring: str = "bf16"):
        super().__init__()
        if scoring not in SCORINGS:
            raise ValueError(f"indexer scoring must be one of {', '.join(SCORINGS)}; got {scoring!r}")
        dim = config.index_head_dim
        if scoring == "fp8" and (dim > 128 or dim & (dim - 1)):
            raise ValueError(f"indexer scoring 'fp8' needs index_head_dim a power of two <= 128; got {dim}; use 'bf16'")
        self.config = config
        self.layer = layer
        self.scoring = scoring
        for name, module in modules.items():
            setattr(self, name, module)

    def project(self, x: torch.Tensor, q_lora: torch.Tensor, angles: torch.Tensor):
        """(q, k, weights) of the tokens, in the scoring's form.

        x: [num_tokens, hidden] (the attention's input); q_lora: [num_tokens,
        q_lora_rank] (the normalised low-rank queries); angles: their RoPE
        angles. "bf16": q [num_tokens, heads, dim] and k [num_tokens, dim] in
        the model's dtype, weights [num_tokens, heads] float32. "fp8": q FP8,
        k an FP8 pair (values, float32 scales [num_tokens]), both after the
        Hadamard rotation, and the query scales and 1/sqrt(dim) folded into
        the weights.
        """
        c = self.config
        rope = c.qk_rope_head_dim
        k = self.k_norm(self.wk(x))
        k = torch.cat([rotate(k[:, None, :rope], angles, interleaved=False)[:, 0], k[:, rope:]], dim=-1)
        q = self.wq_b(q_lora).unflatten(-1, (c.index_n_heads, c.index_head_dim))
        q = torch.cat([rotate(q[..., :rope], angles, interleaved=False), q[..., rope:]], dim=-1)
        weights = self.weights_proj(x).float() * c.index_n_heads**-0.5
        if self.scoring != "fp8":
            return q, k, weights
        q_fp8, q_scales = per_token_cast_to_fp8(hadamard(q))  # one scale per token and head
        k_fp8, k_scales = per_token_cast_to_fp8(hadamard(k))
        return q_fp8, (k_fp8, k_scales[:, 0]), weights * q_scales[..., 0] * c.index_head_dim**-0.5

    def sequence_scores(self, q, k, weights) -> torch.Tensor:
        """The scores [length, length] of one sequence's tokens (from
        :meth:`project`), query by key, -inf above the diagonal."""
        length = weights.shape[0]
        if self.scoring == "fp8":
            from dsinfra import deep_gemm

            starts = torch.zeros(length, dtype=torch.int32, device=weights.device)
            ends = torch.arange(1, length + 1, dtype=torch.int32, device=weights.device)
            return deep_gemm.fp8_mqa_logits(q, k, weights, starts, ends)
        causal = torch.ones(length, length, dtype=torch.bool, device=weights.device).tril()
        return _scores(q, weights, k).masked_fill(~causal, float("-inf"))

    def forward(self, x: torch.Tensor, q_lora: torch.Tensor, angles: torch.Tensor, batch: TokenBatch):
        """The keys each new token attends to (arguments as :meth:`project`).

        Returns, for a prefill or full forward, one boolean mask [length,
        length] per sequence (True: attend); for a decoding step, flash_mla's
        sparse ``indices`` [batch, 1, topk] int32 (cache slots, -1 for none).
        """
        q, k, weights = self.project(x, q_lora, angles)
        if batch.cache is not None:
            batch.extra["indexer"].write(self.layer, batch.slots, k)
        if batch.decoding:
            return self._select_cached(q, weights, batch)
        masks = []
        for rows in batch.sequences():
            keys = (k[0][rows], k[1][rows]) if self.scoring == "fp8" else k[rows]
            scores = self.sequence_scores(q[rows], keys, weights[rows])
            chosen = scores.topk(min(self.config.index_topk, scores.shape[0]), dim=-1).indices
            causal = torch.ones_like(scores, dtype=torch.bool).tril()
            masks.append(torch.zeros_like(causal).scatter_(1, chosen, True) & causal)
        return masks

    def _select_cached(self, q, weights: torch.Tensor, batch: TokenBatch) -> torch.Tensor:
        """Score each sequence's cached keys for its new token; the best as cache slots."""
        cache, keys = batch.cache, batch.extra["indexer"].keys[self.layer]
        lengths = cache.seqlens.long()
        longest = int(lengths.max())
        batch_size = lengths.shape[0]
        positions = torch.arange(longest, device=weights.device).expand(batch_size, -1)
        slots = slots_of(cache, torch.arange(batch_size, device=weights.device)[:, None].expand(-1, longest), positions)
        visible = positions < lengths[:, None]
        if self.scoring == "fp8":
            from dsinfra import deep_gemm

            schedule = deep_gemm.get_paged_mqa_logits_metadata(cache.seqlens, cache.block_size, deep_gemm.get_num_sms())
            scores = deep_gemm.fp8_paged_mqa_logits(
                q.unsqueeze(1), keys, weights, cache.seqlens, cache.block_table, schedule, longest, clean_logits=True
            )
        else:
            cached = keys[slots.masked_fill(~visible, 0)]  # [batch, longest, dim]
            scores = _scores(q[:, None], weights[:, None], cached)[:, 0].masked_fill(~visible, float("-inf"))
        best = scores.topk(min(self.config.index_topk, longest), dim=-1)
        chosen = slots.gather(1, best.indices).masked_fill(best.values == float("-inf"), -1)
        return chosen.to(torch.int32).unsqueeze(1)


def _scores(q: torch.Tensor, weights: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """score[s, t] = sum_h weights[s, h] * relu(q[s, h] . k[t] / sqrt(dim)), in float32.
    q: [..., s, heads, dim]; weights: [..., s, heads] float32; k: [..., t, dim] -> [..., s, t]."""
    logits = torch.einsum("...shd,...td->...sht", q.float(), k.float()) * q.shape[-1] ** -0.5
    return torch.einsum("...sh,...sht->...st", weights, logits.relu_())


def hadamard(x: torch.Tensor) -> torch.Tensor:
    """``x @ H / sqrt(dim)`` over the last dimension (a power of two), H the
    Sylvester Hadamard matrix: an orthogonal rotation, in float32 then x's dtype."""
    dim = x.shape[-1]
    return (x.float() @ _hadamard_matrix(dim, x.device) * (1 / math.sqrt(dim))).to(x.dtype)


@functools.lru_cache(maxsize=None)
def _hadamard_matrix(dim: int, device: torch.device) -> torch.Tensor:
    """The [dim, dim] float32 Sylvester Hadamard matrix (built once per size and
    device, outside inference mode, so that any later call may use it)."""
    with torch.inference_mode(False), torch.no_grad():
        matrix = torch.ones(1, 1, dtype=torch.float32, device=device)
        while matrix.shape[0] < dim:
            matrix = torch.cat([torch.cat([matrix, matrix], 1), torch.cat([matrix, -matrix], 1)], 0)
    return matrix
