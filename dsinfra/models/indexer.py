"""DeepSeek-V3.2's lightning indexer (:class:`Indexer`): which earlier tokens
each query attends to (DeepSeek Sparse Attention).

Each token gets one index key ``k = LayerNorm(wk x)`` and ``index_n_heads``
index queries ``q = wq_b(q_lora)`` (RoPE on the first ``qk_rope_head_dim``
channels, rotating halves), and each query token scores every key it may see::

    score[s, t] = sum_h w[s, h] * relu(softmax_scale * q[s, h] . k[t]),   w = weights_proj(x) / sqrt(index_n_heads)

The ``index_topk`` best keys (all of them, for shorter sequences) are the ones
its attention reads. The scores are computed in float32 from the keys as the
model's dtype holds them, as transformers does, so the same keys are chosen
("bf16" scoring: the default). DeepSeek's own inference scores in FP8 with
DeepGEMM's ``fp8_mqa_logits``; that path ("fp8" scoring) needs those kernels.

Index keys are cached beside the latents (:class:`IndexerCache`, same slots).
"""

from __future__ import annotations

import torch
from torch import nn

from dsinfra.models.checkpoint_config import CheckpointConfig
from dsinfra.models.kv_cache import PagedKVCache
from dsinfra.models.rope import rotate
from dsinfra.models.token_batch import TokenBatch, slots_of

SCORINGS = ("bf16", "fp8")


class IndexerCache:
    """The index keys of every cached token, per layer: [num_blocks * block_size, index_head_dim]
    in ``dtype``, at the latents' slots of ``cache``."""

    def __init__(self, cache: PagedKVCache, num_layers: int, index_head_dim: int, dtype: torch.dtype):
        slots = cache.blocks[0].shape[0] * cache.block_size if cache.blocks else 0
        device = cache.block_table.device
        self.keys = {
            layer: torch.full((slots, index_head_dim), float("nan"), dtype=dtype, device=device) for layer in range(num_layers)
        }


class Indexer(nn.Module):
    """``wq_b``, ``wk``, ``k_norm`` (a LayerNorm with bias) and ``weights_proj``
    of one layer, with transformers' names."""

    def __init__(self, config: CheckpointConfig, layer: int, modules: dict[str, nn.Module], scoring: str = "bf16"):
        super().__init__()
        if scoring not in SCORINGS:
            raise ValueError(f"scoring must be one of {', '.join(SCORINGS)}; got {scoring!r}")
        if scoring == "fp8":
            raise ValueError(
                "indexer scoring 'fp8' needs deep_gemm.fp8_mqa_logits and fp8_paged_mqa_logits, which this "
                "version of dsinfra does not have yet; use scoring 'bf16'"
            )
        self.config = config
        self.layer = layer
        self.scoring = scoring
        for name, module in modules.items():
            setattr(self, name, module)

    def forward(self, x: torch.Tensor, q_lora: torch.Tensor, angles: torch.Tensor, batch: TokenBatch):
        """The keys each new token attends to.

        x: [num_tokens, hidden] (the attention's input); q_lora: [num_tokens,
        q_lora_rank] (the normalised low-rank queries); angles: the tokens'
        RoPE angles. Returns, for a prefill or full forward, one boolean mask
        [length, length] per sequence (True: attend); for a decoding step,
        flash_mla's sparse ``indices`` [batch, 1, topk] int32 (cache slots, -1
        for none).
        """
        c = self.config
        rope = c.qk_rope_head_dim
        k = self.k_norm(self.wk(x))
        k = torch.cat([rotate(k[:, None, :rope], angles, interleaved=False)[:, 0], k[:, rope:]], dim=-1)
        q = self.wq_b(q_lora).unflatten(-1, (c.index_n_heads, c.index_head_dim))
        q = torch.cat([rotate(q[..., :rope], angles, interleaved=False), q[..., rope:]], dim=-1)
        weights = self.weights_proj(x).float() * c.index_n_heads**-0.5
        if batch.cache is not None:
            keys = batch.extra["indexer"].keys[self.layer]
            keys[batch.slots] = k.to(keys.dtype)
        if batch.decoding:
            return self._decode(q, weights, batch)
        masks = []
        for rows in batch.sequences():
            scores = _scores(q[rows], weights[rows], k[rows])  # [length, length]
            length = scores.shape[0]
            causal = torch.ones(length, length, dtype=torch.bool, device=x.device).tril()
            chosen = scores.masked_fill(~causal, float("-inf")).topk(min(c.index_topk, length), dim=-1).indices
            mask = torch.zeros_like(causal).scatter_(1, chosen, True)
            masks.append(mask & causal)
        return masks

    def _decode(self, q: torch.Tensor, weights: torch.Tensor, batch: TokenBatch) -> torch.Tensor:
        """Score each sequence's cached keys for its new token; the best as cache slots."""
        cache = batch.cache
        lengths = cache.seqlens.long()
        longest = int(lengths.max())
        batch_size = lengths.shape[0]
        positions = torch.arange(longest, device=q.device).expand(batch_size, -1)
        slots = slots_of(cache, torch.arange(batch_size, device=q.device)[:, None].expand(-1, longest), positions)
        visible = positions < lengths[:, None]
        keys = batch.extra["indexer"].keys[self.layer][slots.masked_fill(~visible, 0)]  # [batch, longest, dim]
        scores = _scores(q[:, None], weights[:, None], keys)[:, 0].masked_fill(~visible, float("-inf"))
        best = scores.topk(min(self.config.index_topk, longest), dim=-1)
        chosen = slots.gather(1, best.indices).masked_fill(best.values == float("-inf"), -1)
        return chosen.to(torch.int32).unsqueeze(1)


def _scores(q: torch.Tensor, weights: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """score[s, t] = sum_h weights[s, h] * relu(q[s, h] . k[t] / sqrt(dim)), in float32.
    q: [..., s, heads, dim]; weights: [..., s, heads] float32; k: [..., t, dim] -> [..., s, t]."""
    logits = torch.einsum("...shd,...td->...sht", q.float(), k.float()) * q.shape[-1] ** -0.5
    return torch.einsum("...sh,...sht->...st", weights, logits.relu_())
