"""DeepSeek-V2 / V3 / R1 / V3.2 checkpoints in Hugging Face's format, loaded for
inference: :func:`load_pretrained` and :class:`PretrainedModel`.

    from dsinfra.models import load_pretrained
    model = load_pretrained("path/to/checkpoint")
    logits = model(input_ids)                          # [batch, seq, vocab] float32, full causal forward
    new_ids = model.generate([[1, 2, 3], [4, 5]], 16)  # greedy, through the paged latent cache

The modules keep transformers' names (``model.layers.3.self_attn.kv_b_proj``,
...), so the state dict names the checkpoint's tensors, except that each MoE
layer's experts are stacked (``mlp.experts.gate_proj`` [experts, n, k]).

Memory: tensors are read one at a time from the memory-mapped safetensors
files into the module that keeps them, converted to the model's dtype on the
way (FP8 weights stay FP8, with their block scales); stacked experts are
filled one expert at a time. A rank of an expert-parallel group reads the
experts of its own slots only (``expert_placement``). Multi-token prediction
layers (``model.layers.N`` for N >= num_hidden_layers) are not read.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from dsinfra.models.checkpoint import Checkpoint
from dsinfra.models.checkpoint_config import CheckpointConfig, CheckpointError
from dsinfra.models.grouped_experts import GroupedExperts
from dsinfra.models.indexer import Indexer
from dsinfra.models.latent_attention import LatentAttention
from dsinfra.models.layers import RMSNorm
from dsinfra.models.linear import Linear
from dsinfra.models.rope import Rotary
from dsinfra.models.router import Router
from dsinfra.models.sparse_moe import GatedMLP, SparseMoE
from dsinfra.models.token_batch import TokenBatch, positions_of

FP8_BLOCK = 128


class DecoderLayer(nn.Module):
    def __init__(self, input_layernorm: RMSNorm, self_attn: LatentAttention, post_attention_layernorm: RMSNorm, mlp: nn.Module):
        super().__init__()
        self.input_layernorm, self.self_attn = input_layernorm, self_attn
        self.post_attention_layernorm, self.mlp = post_attention_layernorm, mlp

    def forward(self, x: torch.Tensor, batch: TokenBatch) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), batch)
        h = self.post_attention_layernorm(x)
        return x + (self.mlp(h, batch.decoding) if isinstance(self.mlp, SparseMoE) else self.mlp(h))


class PretrainedModel(nn.Module):
    """A loaded checkpoint: ``model.embed_tokens``, ``model.layers``,
    ``model.norm``, ``lm_head``; ``config`` is its :class:`CheckpointConfig`.

    ``dtype``: the dtype of its activations and float weights. ``cache_dtype``:
    the paged latent cache's, one FlashMLA decodes: bfloat16 for bfloat16
    models, float16 (3 more bits) for float16 and float32 ones; settable.
    ``path``: the checkpoint, re-read when experts move. ``indexer_scoring``:
    how V3.2's indexer scores keys (see :mod:`dsinfra.models.indexer`).
    """

    def __init__(
        self, config: CheckpointConfig, model: nn.Module, lm_head: Linear, *, dtype: torch.dtype, path: str, indexer_scoring: str
    ):
        super().__init__()
        self.config = config
        self.indexer_scoring = indexer_scoring
        self.model = model
        self.lm_head = lm_head
        self.dtype = dtype
        self.cache_dtype = torch.bfloat16 if dtype == torch.bfloat16 else torch.float16
        self.path = path

    @property
    def device(self) -> torch.device:
        return self.model.embed_tokens.weight.device

    def moe_layers(self) -> list[SparseMoE]:
        return [layer.mlp for layer in self.model.layers if isinstance(layer.mlp, SparseMoE)]

    def hidden_states(self, tokens: torch.Tensor, batch: TokenBatch) -> torch.Tensor:
        """tokens: [num_tokens] int64, the batch's new tokens -> final-norm hidden states [num_tokens, hidden]."""
        x = self.model.embed_tokens(tokens)
        for layer in self.model.layers:
            x = layer(x, batch)
        return self.model.norm(x)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()

    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids: [batch, seq] int64 -> logits [batch, seq, vocab] float32 (a full causal forward, no cache)."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, seq]; got shape {list(input_ids.shape)}")
        batch_size, seq = input_ids.shape
        batch = TokenBatch([seq] * batch_size, positions_of([seq] * batch_size, self.device))
        hidden = self.hidden_states(input_ids.to(self.device).reshape(-1), batch)
        return self.logits(hidden).view(batch_size, seq, -1)

    def generate(self, prompts: list[list[int]], max_new_tokens: int, **options) -> list[list[int]]:
        """Greedy continuations of ``prompts`` (token-id lists of any lengths):
        see :func:`dsinfra.models.generation.generate`."""
        from dsinfra.models.generation import generate

        return generate(self, prompts, max_new_tokens, **options)


def load_pretrained(
    path: str | os.PathLike,
    *,
    dtype: torch.dtype | None = None,
    device: torch.device | str = "cpu",
    expert_placement: list[list[int]] | None = None,
    indexer_scoring: str | None = None,
) -> PretrainedModel:
    """Load the checkpoint in directory ``path`` (config.json + safetensors).

    dtype: of the activations and float weights; default: the checkpoint's
        (the dtype of its embeddings). FP8 weights stay FP8 either way.
    device: where the model lives; "meta" reads no weight but checks every
        tensor the model needs against the config (names, shapes), from the
        files' headers: a cheap check of a whole directory.
    expert_placement: per MoE layer, the logical experts this rank holds, one
        per slot (replicas repeat an expert); default: all of them, in order.
    indexer_scoring: how V3.2's indexer scores keys: "bf16" (float32 math on
        the model's keys: the keys transformers selects) or "fp8" (DeepGEMM's
        FP8 MQA logits, as DeepSeek's inference); default "fp8" for FP8
        checkpoints, else "bf16". See :mod:`dsinfra.models.indexer`.

    Raises :class:`CheckpointError` (one line) for a directory that cannot be loaded.
    """
    checkpoint = Checkpoint(path)
    config = checkpoint.config
    if indexer_scoring is None:
        indexer_scoring = "fp8" if config.fp8 else "bf16"
    floats = (torch.float32, torch.bfloat16, torch.float16)
    if dtype is None:
        dtype = checkpoint.dtype("model.embed_tokens.weight")
        if dtype not in floats:
            raise CheckpointError(f"model.embed_tokens.weight must be float32, bfloat16 or float16; got {dtype}")
    elif dtype not in floats:
        raise ValueError(f"dtype must be torch.float32, torch.bfloat16 or torch.float16; got {dtype}")
    reader = _Reader(checkpoint, dtype, torch.device(device))
    if expert_placement is not None and len(expert_placement) != config.num_moe_layers:
        raise ValueError(f"expert_placement must list the experts of each of the {config.num_moe_layers} MoE layers")
    h = config.hidden_size
    rotary = Rotary(config.rope, config.qk_rope_head_dim, device)
    model = nn.Module()
    model.embed_tokens = nn.Embedding.from_pretrained(reader.tensor("model.embed_tokens.weight", (config.vocab_size, h)))
    layers, moe_index = [], 0
    for layer in range(config.num_hidden_layers):
        prefix = f"model.layers.{layer}."
        if config.moe_layers[layer]:
            placement = None if expert_placement is None else expert_placement[moe_index]
            mlp = _moe(reader, config, prefix + "mlp.", moe_index, placement)
            moe_index += 1
        else:
            mlp = _mlp(reader, prefix + "mlp.", h, config.intermediate_size)
        layers.append(DecoderLayer(
            reader.rms_norm(prefix + "input_layernorm.weight", h, config.rms_norm_eps),
            _attention(reader, config, layer, prefix + "self_attn.", rotary, indexer_scoring),
            reader.rms_norm(prefix + "post_attention_layernorm.weight", h, config.rms_norm_eps),
            mlp,
        ))
    model.layers = nn.ModuleList(layers)
    model.norm = reader.rms_norm("model.norm.weight", h, config.rms_norm_eps)
    if config.tie_word_embeddings:
        lm_head = Linear(model.embed_tokens.weight)
    else:
        lm_head = reader.linear("lm_head", config.vocab_size, h)
    return PretrainedModel(config, model, lm_head, dtype=dtype, path=os.fspath(path), indexer_scoring=indexer_scoring).eval()


def read_experts(model: PretrainedModel, placement: list[list[int]]) -> list[GroupedExperts]:
    """Read from ``model``'s checkpoint, for each MoE layer, the logical experts
    ``placement[layer]`` (one per slot, replicas repeated), stacked."""
    config = model.config
    reader = _Reader(Checkpoint(model.path), model.dtype, model.device)
    prefixes = [f"model.layers.{i}.mlp." for i, moe in enumerate(config.moe_layers) if moe]
    if len(placement) != len(prefixes):
        raise ValueError(f"placement must list the experts of each of the {len(prefixes)} MoE layers")
    return [
        reader.experts(prefix, _checked_placement(config, i, logical), config.hidden_size, config.moe_intermediate_size)
        for i, (prefix, logical) in enumerate(zip(prefixes, placement))
    ]


def _checked_placement(config: CheckpointConfig, moe_index: int, logical: list[int]) -> list[int]:
    if any(isinstance(e, bool) or not isinstance(e, int) or not 0 <= e < config.n_routed_experts for e in logical):
        raise ValueError(f"expert_placement[{moe_index}] must hold expert ids in [0, {config.n_routed_experts}); got {logical}")
    return list(logical)


class _Reader:
    """Reads the checkpoint's tensors into modules, checking shapes against the config."""

    def __init__(self, checkpoint: Checkpoint, dtype: torch.dtype, device: torch.device):
        self.checkpoint, self.dtype, self.device = checkpoint, dtype, device

    def tensor(self, name: str, shape: tuple[int, ...], dtype: torch.dtype | None = None) -> torch.Tensor:
        """The tensor ``name``, checked to have ``shape``, in ``dtype`` (default the
        model's; FP8 stays FP8) on the device; on the meta device, from the header alone."""
        dtype = dtype or self.dtype
        if self.device.type != "meta":
            return self.checkpoint.read(name, shape, dtype).to(self.device)
        if self.checkpoint.shape(name) != tuple(shape):
            self.checkpoint.read(name, shape)  # raises the mismatch
        stored = self.checkpoint.dtype(name)
        return torch.empty(shape, dtype=stored if stored == torch.float8_e4m3fn else dtype, device="meta")

    def is_fp8(self, name: str) -> bool:
        return name + "_scale_inv" in self.checkpoint

    def linear(self, prefix: str, out_features: int, in_features: int) -> Linear:
        name = prefix + ".weight"
        weight = self.tensor(name, (out_features, in_features))
        if not self.is_fp8(name):
            if weight.dtype == torch.float8_e4m3fn:
                raise CheckpointError(f"{name} is float8_e4m3fn but the checkpoint has no {name}_scale_inv")
            return Linear(weight)
        return Linear(weight, self.tensor(name + "_scale_inv", _block_scales(out_features, in_features), torch.float32))

    def rms_norm(self, name: str, dim: int, eps: float) -> RMSNorm:
        norm = RMSNorm(dim, eps)
        norm.weight = nn.Parameter(self.tensor(name, (dim,)), requires_grad=False)
        return norm

    def layer_norm(self, prefix: str, dim: int) -> nn.LayerNorm:
        norm = nn.LayerNorm(dim, eps=1e-6, device="meta")
        norm.weight = nn.Parameter(self.tensor(prefix + ".weight", (dim,)), requires_grad=False)
        norm.bias = nn.Parameter(self.tensor(prefix + ".bias", (dim,)), requires_grad=False)
        return norm

    def experts(self, prefix: str, logical: list[int], hidden: int, inter: int) -> GroupedExperts:
        """Experts ``logical`` of the MoE block at ``prefix``, stacked, one read at a time."""
        shapes = {"gate_proj": (inter, hidden), "up_proj": (inter, hidden), "down_proj": (hidden, inter)}
        fp8 = self.is_fp8(f"{prefix}experts.0.gate_proj.weight")
        weights, scales = {}, ({} if fp8 else None)
        for name, shape in shapes.items():
            weights[name] = torch.empty(len(logical), *shape, dtype=torch.float8_e4m3fn if fp8 else self.dtype, device=self.device)
            if fp8:
                scales[name] = torch.empty(len(logical), *_block_scales(*shape), dtype=torch.float32, device=self.device)
            for slot, expert in enumerate(logical):
                tensor_name = f"{prefix}experts.{expert}.{name}.weight"
                if self.is_fp8(tensor_name) != fp8:
                    raise CheckpointError(f"{tensor_name}: the experts of one layer must be all FP8 or all not")
                weights[name][slot] = self.tensor(tensor_name, shape)
                if fp8:
                    scales[name][slot] = self.tensor(tensor_name + "_scale_inv", _block_scales(*shape), torch.float32)
        return GroupedExperts(weights, scales)


def _block_scales(out_features: int, in_features: int) -> tuple[int, int]:
    return -(-out_features // FP8_BLOCK), -(-in_features // FP8_BLOCK)


def _mlp(reader: _Reader, prefix: str, hidden: int, inter: int) -> GatedMLP:
    return GatedMLP(
        reader.linear(prefix + "gate_proj", inter, hidden),
        reader.linear(prefix + "up_proj", inter, hidden),
        reader.linear(prefix + "down_proj", hidden, inter),
    )


def _moe(reader: _Reader, config: CheckpointConfig, prefix: str, moe_index: int, placement: list[int] | None) -> SparseMoE:
    experts = config.n_routed_experts
    placement = list(range(experts)) if placement is None else _checked_placement(config, moe_index, placement)
    bias_name = prefix + "gate.e_score_correction_bias"
    gate = Router(
        config,
        reader.tensor(prefix + "gate.weight", (experts, config.hidden_size), torch.float32),
        reader.tensor(bias_name, (experts,), torch.float32) if config.topk_method == "noaux_tc" else None,
    )
    shared = None
    if config.n_shared_experts:
        shared = _mlp(reader, prefix + "shared_experts.", config.hidden_size, config.n_shared_experts * config.moe_intermediate_size)
    routed = reader.experts(prefix, placement, config.hidden_size, config.moe_intermediate_size)
    return SparseMoE(moe_index, gate, routed, shared)


def _attention(reader: _Reader, config: CheckpointConfig, layer: int, prefix: str, rotary: Rotary, scoring: str) -> LatentAttention:
    c, heads = config, config.num_attention_heads
    modules = {}
    if c.q_lora_rank is None:
        modules["q_proj"] = reader.linear(prefix + "q_proj", heads * c.qk_head_dim, c.hidden_size)
    else:
        modules["q_a_proj"] = reader.linear(prefix + "q_a_proj", c.q_lora_rank, c.hidden_size)
        modules["q_a_layernorm"] = reader.rms_norm(prefix + "q_a_layernorm.weight", c.q_lora_rank, c.rms_norm_eps)
        modules["q_b_proj"] = reader.linear(prefix + "q_b_proj", heads * c.qk_head_dim, c.q_lora_rank)
    modules["kv_a_proj_with_mqa"] = reader.linear(prefix + "kv_a_proj_with_mqa", c.kv_lora_rank + c.qk_rope_head_dim, c.hidden_size)
    modules["kv_a_layernorm"] = reader.rms_norm(prefix + "kv_a_layernorm.weight", c.kv_lora_rank, c.rms_norm_eps)
    modules["kv_b_proj"] = reader.linear(prefix + "kv_b_proj", heads * (c.qk_nope_head_dim + c.v_head_dim), c.kv_lora_rank)
    modules["o_proj"] = reader.linear(prefix + "o_proj", c.hidden_size, heads * c.v_head_dim)
    if c.has_indexer:
        index = prefix + "indexer."
        modules["indexer"] = Indexer(c, layer, {
            "wq_b": reader.linear(index + "wq_b", c.index_n_heads * c.index_head_dim, c.q_lora_rank),
            "wk": reader.linear(index + "wk", c.index_head_dim, c.hidden_size),
            "k_norm": reader.layer_norm(index + "k_norm", c.index_head_dim),
            "weights_proj": reader.linear(index + "weights_proj", c.index_n_heads, c.hidden_size),
        }, scoring)
    return LatentAttention(c, layer, modules, rotary)
