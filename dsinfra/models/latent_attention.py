"""Multi-head latent attention of a loaded checkpoint (:class:`LatentAttention`),
with transformers' parameter names.

- Prefill and the full forward expand each token's latent into per-head keys
  and values with ``kv_b_proj`` and attend causally, sequence by sequence, as
  transformers does (and DeepSeek's prefill).
- Decoding absorbs ``kv_b_proj`` into the query and the output and attends
  over the paged latents with :func:`dsinfra.flash_mla.flash_mla_with_kvcache`
  (see :mod:`dsinfra.models.mla`); with V3.2's indexer, over the keys it
  selected, through flash_mla's sparse ``indices``.

FP8 checkpoints: every projection casts its input per token (1x128) for
DeepGEMM but ``kv_b_proj``, which decoding absorbs into the queries and
outputs: as DeepSeek's inference does, its weight is dequantised (one layer
at a time, on every call, so no second copy is kept) and the latents it
multiplies stay unquantized, in prefill too, so both agree.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dsinfra.models.checkpoint_config import CheckpointConfig
from dsinfra.models.expanded_attention import expanded_attention
from dsinfra.models.rope import Rotary, rotate
from dsinfra.models.token_batch import TokenBatch


class LatentAttention(nn.Module):
    """Projections: ``q_proj``, or ``q_a_proj`` -> ``q_a_layernorm`` -> ``q_b_proj``
    (low-rank queries); ``kv_a_proj_with_mqa`` (latent and RoPE key) ->
    ``kv_a_layernorm``; ``kv_b_proj`` (latent -> per-head keys and values);
    ``o_proj``. ``indexer``: V3.2's lightning indexer, or None."""

    def __init__(self, config: CheckpointConfig, layer: int, modules: dict[str, nn.Module], rotary: Rotary):
        super().__init__()
        self.config = config
        self.layer = layer
        self.rotary = rotary
        self.q_proj = self.q_a_proj = self.q_a_layernorm = self.q_b_proj = self.indexer = None
        for name, module in modules.items():
            setattr(self, name, module)

    def forward(self, x: torch.Tensor, batch: TokenBatch) -> torch.Tensor:
        """x: [num_tokens, hidden], the batch's new tokens -> [num_tokens, hidden]."""
        c = self.config
        if batch.num_tokens == 0:
            return torch.zeros_like(x)
        angles = batch.angles(self.rotary)
        q_lora = self.q_a_layernorm(self.q_a_proj(x)) if c.q_lora_rank is not None else None
        q = (self.q_b_proj(q_lora) if q_lora is not None else self.q_proj(x)).unflatten(-1, (c.num_attention_heads, c.qk_head_dim))
        q_nope, q_pe = q.split([c.qk_nope_head_dim, c.qk_rope_head_dim], dim=-1)
        q_pe = rotate(q_pe, angles, interleaved=c.rope_interleave)
        latent, k_pe = self.kv_a_proj_with_mqa(x).split([c.kv_lora_rank, c.qk_rope_head_dim], dim=-1)
        latent = self.kv_a_layernorm(latent)
        k_pe = rotate(k_pe.unsqueeze(-2), angles, interleaved=c.rope_interleave).squeeze(-2)
        if batch.cache is not None:
            blocks = batch.cache.blocks[self.layer]
            blocks.view(-1, blocks.shape[-1])[batch.slots] = torch.cat([latent, k_pe], dim=-1).to(blocks.dtype)
        selected = self.indexer(x, q_lora, angles, batch) if self.indexer is not None else None
        if batch.decoding:
            out = self._decode(q_nope, q_pe, batch, selected)
        else:
            out = self._prefill(q_nope, q_pe, latent, k_pe, batch, selected)
        return self.o_proj(out.flatten(-2))

    def _prefill(self, q_nope, q_pe, latent, k_pe, batch: TokenBatch, selected) -> torch.Tensor:
        """Expanded attention, causal (and limited to the indexer's choices), per sequence."""
        c = self.config
        kv = F.linear(latent, self.kv_b_proj.dequantized(latent.dtype))  # unquantized latents, as decoding reads them
        k_nope, v = kv.unflatten(-1, (c.num_attention_heads, -1)).split([c.qk_nope_head_dim, c.v_head_dim], -1)
        q = torch.cat([q_nope, q_pe], dim=-1)
        k = torch.cat([k_nope, k_pe.unsqueeze(-2).expand(-1, c.num_attention_heads, -1)], dim=-1)
        out = torch.empty(*q.shape[:-1], c.v_head_dim, dtype=q.dtype, device=q.device)
        for i, rows in enumerate(batch.sequences()):
            qs, ks, vs = (t[rows].transpose(0, 1).unsqueeze(0) for t in (q, k, v))  # [1, heads, length, dim]
            mask = None if selected is None else selected[i]
            out[rows] = expanded_attention(qs, ks, vs, c.softmax_scale, mask)[0].transpose(0, 1)
        return out

    def _absorbed_weights(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """kv_b_proj per head: w_uk [heads, qk_nope_head_dim, kv_lora_rank], w_uv [heads, v_head_dim, kv_lora_rank]
        (views of a float weight; an FP8 one dequantised)."""
        c = self.config
        weight = self.kv_b_proj.dequantized(dtype).unflatten(0, (c.num_attention_heads, -1))
        return weight.split([c.qk_nope_head_dim, c.v_head_dim], dim=1)

    def _decode(self, q_nope, q_pe, batch: TokenBatch, selected) -> torch.Tensor:
        """Absorbed attention of one new token per sequence over the paged latents."""
        from dsinfra import flash_mla

        c, cache = self.config, batch.cache
        w_uk, w_uv = self._absorbed_weights(q_nope.dtype)
        q_latent = torch.bmm(q_nope.transpose(0, 1), w_uk).transpose(0, 1)  # [batch, heads, kv_lora_rank]
        q = torch.cat([q_latent, q_pe], dim=-1).to(cache.dtype).unsqueeze(1)  # [batch, 1, heads, width]
        if selected is None:
            out_latent, _ = flash_mla.flash_mla_with_kvcache(
                q, cache.blocks[self.layer], cache.block_table, cache.seqlens, c.kv_lora_rank,
                *cache.metadata(c.num_attention_heads), softmax_scale=c.softmax_scale, causal=True,
            )
        else:
            out_latent, _ = flash_mla.flash_mla_with_kvcache(
                q, cache.blocks[self.layer], None, None, c.kv_lora_rank, *cache.metadata(c.num_attention_heads, selected.shape[-1]),
                softmax_scale=c.softmax_scale, indices=selected,
            )
        return torch.bmm(out_latent[:, 0].to(q_nope.dtype).transpose(0, 1), w_uv.transpose(1, 2)).transpose(0, 1)
