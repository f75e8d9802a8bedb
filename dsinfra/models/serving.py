"""Serving the model: greedy generation over a paged latent cache (FlashMLA),
and the placement of experts by an EPLB plan across expert-parallel ranks.

Every rank of the expert-parallel group serves its own batch of requests
(attention is data parallel, as in DeepSeek's serving); the MoE layers reach
the experts on all ranks through deep_ep's low-latency dispatch and combine.
"""

from __future__ import annotations

import copy
import dataclasses

import torch
from torch import nn

from dsinfra.models.kv_cache import PagedKVCache
from dsinfra.models.moe import MoE
from dsinfra.models.parallel import LowLatencyExperts, expert_range
from dsinfra.models.transformer import Transformer


@dataclasses.dataclass
class Generation:
    """What :func:`generate` produced for a batch of requests."""

    prompts: list[torch.Tensor]  # [prompt_len] int64 each
    tokens: torch.Tensor  # [batch, new_tokens] int64, the greedy continuation
    logits: torch.Tensor  # [batch, new_tokens, vocab] float32: the logits each token was chosen from

    def sequences(self) -> list[torch.Tensor]:
        """Each request's prompt and continuation, without the last token (whose
        logits were not computed): what a full forward must agree on."""
        return [torch.cat([p, t[:-1]]) for p, t in zip(self.prompts, self.tokens)]


@torch.no_grad()
def generate(
    model: Transformer, prompts: list[torch.Tensor], new_tokens: int, *, block_size: int = 64, step_hook=None
) -> Generation:
    """Greedy generation of ``new_tokens`` tokens for each prompt.

    Each prompt is prefilled on its own (one call with all its tokens, causal
    over the cache), then every step decodes one token of every request at
    once: a batch of sequences of different lengths, the case FlashMLA is for.
    ``step_hook(step, run)``, if given, is called instead of ``run()`` for each
    decode step and returns what ``run()`` returns (to trace a step, say).
    """
    device = model.embed.weight.device
    longest = max(len(p) for p in prompts) + new_tokens
    cache = PagedKVCache(model.args, model.args.n_layers, len(prompts), longest, block_size=block_size, device=device)
    first_logits = [model.decode(p[None].to(device), cache.rows(i, i + 1))[0, -1] for i, p in enumerate(prompts)]
    logits = [torch.stack(first_logits)]
    tokens = [logits[0].argmax(-1)]
    for step in range(1, new_tokens):
        def decode_step():
            return model.decode(tokens[-1][:, None], cache)[:, 0]

        step_logits = step_hook(step, decode_step) if step_hook else decode_step()
        logits.append(step_logits)
        tokens.append(step_logits.argmax(-1))
    return Generation([p.cpu() for p in prompts], torch.stack(tokens, 1).cpu(), torch.stack(logits, 1).cpu())


@torch.no_grad()
def full_attention_logits(model: Transformer, generation: Generation) -> torch.Tensor:
    """The model's own full-attention forward over each generated sequence:
    the logits at the positions :func:`generate` chose tokens from, [batch,
    new_tokens, vocab]."""
    device = model.embed.weight.device
    rows = []
    for prompt, sequence in zip(generation.prompts, generation.sequences()):
        rows.append(model(sequence[None].to(device))[0, len(prompt) - 1 :].cpu())
    return torch.stack(rows)


def place_experts(moe: MoE, phy2log: torch.Tensor, rank: int, num_ranks: int) -> range:
    """Give ``moe`` the physical slots rank ``rank`` holds under a plan:
    ``phy2log`` [num_slots] is the layer's logical expert of every slot (a
    replica is a copy of its expert). Returns the slots."""
    slots = expert_range(len(phy2log), rank, num_ranks)
    logical = moe.experts.experts
    moe.experts.experts = nn.ModuleList(copy.deepcopy(logical[int(phy2log[s])]) for s in slots)
    return slots


def serve_expert_parallel(
    model: Transformer, group, plan: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None, max_tokens: int
) -> list[LowLatencyExperts]:
    """Spread ``model``'s routed experts over the ranks of ``group`` for
    decoding: by ``plan`` = (phy2log, log2phy, logcnt) from
    :func:`dsinfra.eplb.rebalance_experts` (one row per MoE layer), or in order
    without replicas. Returns the dispatchers, one per MoE layer, whose
    ``loads`` count what every rank received."""
    from dsinfra.deep_ep import Buffer

    moe_layers = model.moe_layers()
    num_slots = plan[0].shape[1] if plan is not None else model.args.n_routed_experts
    hidden = model.args.dim
    size = Buffer.get_low_latency_rdma_size_hint(max_tokens, hidden, group.size(), num_slots)
    buffer = Buffer(group, 0, size, low_latency_mode=True)
    dispatchers = []
    for index, moe in enumerate(moe_layers):
        if plan is None:
            place_experts(moe, torch.arange(num_slots), group.rank(), group.size())
            placement = None
        else:
            phy2log, log2phy, logcnt = plan
            place_experts(moe, phy2log[index], group.rank(), group.size())
            placement = (log2phy[index], logcnt[index])
        moe.dispatcher = LowLatencyExperts(buffer, num_slots, max_tokens, placement)
        dispatchers.append(moe.dispatcher)
    return dispatchers
