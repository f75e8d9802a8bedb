"""Multi-head latent attention (MLA), DeepSeek-V3's attention.

Keys and values are compressed into one latent per token, ``kv_lora_rank``
wide, plus a ``qk_rope_head_dim`` RoPE part shared by all heads; the KV cache
stores only these ``kv_lora_rank + qk_rope_head_dim`` values per token.

- :meth:`MLA.forward` (training, prefill, the check): expands the latent into
  per-head keys and values with ``wkv_b`` and runs causal attention.
- :meth:`MLA.decode` (serving): absorbs ``wkv_b`` into the query and the output
  instead, so attention runs directly over the cached latents — one KV head of
  width ``kv_lora_rank + qk_rope_head_dim``, values the first ``kv_lora_rank``
  channels — which is exactly FlashMLA's problem: it calls
  :func:`dsinfra.flash_mla.flash_mla_with_kvcache`.
"""

from __future__ import annotations

import torch
from torch import nn

from dsinfra.models.config import ModelArgs
from dsinfra.models.expanded_attention import expanded_attention
from dsinfra.models.kv_cache import PagedKVCache
from dsinfra.models.layers import RMSNorm, apply_rotary, plain_linear


class MLA(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        h = args.n_heads
        if args.q_lora_rank:
            self.wq_a = plain_linear(args.dim, args.q_lora_rank)
            self.q_norm = RMSNorm(args.q_lora_rank)
            self.wq_b = plain_linear(args.q_lora_rank, h * args.qk_head_dim)
        else:
            self.wq = plain_linear(args.dim, h * args.qk_head_dim)
        self.wkv_a = plain_linear(args.dim, args.kv_lora_rank + args.qk_rope_head_dim)
        self.kv_norm = RMSNorm(args.kv_lora_rank)
        self.wkv_b = plain_linear(args.kv_lora_rank, h * (args.qk_nope_head_dim + args.v_head_dim))
        self.wo = plain_linear(h * args.v_head_dim, args.dim)

    def _queries(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """q_nope [b, s, h, qk_nope_head_dim], q_pe [b, s, h, qk_rope_head_dim] (rotated)."""
        a = self.args
        q = self.wq_b(self.q_norm(self.wq_a(x))) if a.q_lora_rank else self.wq(x)
        q_nope, q_pe = q.unflatten(-1, (a.n_heads, a.qk_head_dim)).split([a.qk_nope_head_dim, a.qk_rope_head_dim], -1)
        return q_nope, apply_rotary(q_pe, cos, sin)

    def latents(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """What the cache stores for each token: [b, s, kv_lora_rank + qk_rope_head_dim],
        the normalised latent then the rotated RoPE key."""
        a = self.args
        kv, k_pe = self.wkv_a(x).split([a.kv_lora_rank, a.qk_rope_head_dim], -1)
        k_pe = apply_rotary(k_pe.unsqueeze(-2), cos, sin).squeeze(-2)
        return torch.cat([self.kv_norm(kv), k_pe], dim=-1)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Causal attention over ``x [b, s, dim]``; cos/sin: [s, rope_dim / 2] for its positions."""
        a = self.args
        q_nope, q_pe = self._queries(x, cos, sin)
        latent, k_pe = self.latents(x, cos, sin).split([a.kv_lora_rank, a.qk_rope_head_dim], -1)
        k_nope, v = self.wkv_b(latent).unflatten(-1, (a.n_heads, -1)).split([a.qk_nope_head_dim, a.v_head_dim], -1)
        q = torch.cat([q_nope, q_pe], dim=-1)
        k = torch.cat([k_nope, k_pe.unsqueeze(-2).expand(-1, -1, a.n_heads, -1)], dim=-1)
        out = expanded_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), a.softmax_scale)
        return self.wo(out.transpose(1, 2).flatten(2))

    def _absorbed(self) -> tuple[torch.Tensor, torch.Tensor]:
        """wkv_b split per head: w_uk [h, qk_nope_head_dim, kv_lora_rank], w_uv [h, v_head_dim, kv_lora_rank]."""
        a = self.args
        w = self.wkv_b.weight.unflatten(0, (a.n_heads, -1))
        return w[:, : a.qk_nope_head_dim], w[:, a.qk_nope_head_dim :]

    def decode(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: PagedKVCache, layer: int
    ) -> torch.Tensor:
        """Attend from the new tokens ``x [b, s_q, dim]`` (positions given by
        cos/sin: [b, s_q, rope_dim / 2]) to everything in ``cache`` for ``layer``,
        after writing the new tokens' latents into it.

        Runs :func:`dsinfra.flash_mla.flash_mla_with_kvcache` over the paged
        latents in ``cache.dtype``; returns [b, s_q, dim] in x's dtype.
        """
        from dsinfra import flash_mla

        a = self.args
        cache.write(layer, self.latents(x, cos, sin))
        q_nope, q_pe = self._queries(x, cos, sin)
        w_uk, w_uv = self._absorbed()
        q_latent = torch.einsum("bshd,hdc->bshc", q_nope, w_uk)  # absorb the key up-projection
        q = torch.cat([q_latent, q_pe], dim=-1).to(cache.dtype)
        out_latent, _ = flash_mla.flash_mla_with_kvcache(
            q,
            cache.blocks[layer],
            cache.block_table,
            cache.seqlens,
            a.kv_lora_rank,
            *cache.metadata(a.n_heads),
            softmax_scale=a.softmax_scale,
            causal=True,
        )
        out = torch.einsum("bshc,hdc->bshd", out_latent.to(x.dtype), w_uv)  # absorb the value up-projection
        return self.wo(out.flatten(2))
