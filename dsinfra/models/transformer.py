"""The DeepSeek-V3-style transformer: embedding, blocks of MLA + (dense MLP or
MoE), final norm and output head."""

from __future__ import annotations

import torch
from torch import nn

from dsinfra.models.config import ModelArgs
from dsinfra.models.kv_cache import PagedKVCache
from dsinfra.models.layers import MLP, LinearFactory, RMSNorm, plain_linear, rotary_tables
from dsinfra.models.mla import MLA
from dsinfra.models.moe import MoE


class Block(nn.Module):
    def __init__(self, args: ModelArgs, layer: int, expert_linear: LinearFactory = plain_linear):
        super().__init__()
        self.layer = layer
        self.attn_norm = RMSNorm(args.dim)
        self.attn = MLA(args)
        self.ffn_norm = RMSNorm(args.dim)
        self.ffn = MoE(args, layer, expert_linear) if args.is_moe_layer(layer) else MLP(args.dim, args.inter_dim)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), cos, sin)
        return x + self.ffn(self.ffn_norm(x))

    def decode(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: PagedKVCache, slot: int) -> torch.Tensor:
        x = x + self.attn.decode(self.attn_norm(x), cos, sin, cache, slot)
        return x + self.ffn(self.ffn_norm(x))


class Transformer(nn.Module):
    """tokens [batch, seq] int64 -> logits [batch, seq, vocab_size] float32."""

    def __init__(self, args: ModelArgs, expert_linear: LinearFactory = plain_linear, seed: int = 0):
        super().__init__()
        self.args = args
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.embed = nn.Embedding(args.vocab_size, args.dim)
            self.layers = nn.ModuleList(Block(args, i, expert_linear) for i in range(args.n_layers))
            self.norm = RMSNorm(args.dim)
            self.head = plain_linear(args.dim, args.vocab_size)
        cos, sin = rotary_tables(args.qk_rope_head_dim, args.max_seq_len, args.rope_theta)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        seq = tokens.shape[1]
        x = self.embed(tokens)
        for block in self.layers:
            x = block(x, self.cos[:seq], self.sin[:seq])
        return self.head(self.norm(x)).float()

    def moe_layers(self) -> list[MoE]:
        return [block.ffn for block in self.layers if isinstance(block.ffn, MoE)]

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor, cache: PagedKVCache) -> torch.Tensor:
        """Feed ``tokens [batch, s_q]``, the next tokens of every sequence in
        ``cache``, attending through the paged cache (FlashMLA); returns their
        logits [batch, s_q, vocab_size]."""
        positions = cache.advance(tokens.shape[1])
        cos, sin = self.cos[positions], self.sin[positions]
        x = self.embed(tokens)
        for slot, block in enumerate(self.layers):
            x = block.decode(x, cos, sin, cache, slot)
        return self.head(self.norm(x)).float()
