"""The config.json of a Hugging Face DeepSeek checkpoint, read into what the
model needs: :func:`parse_config` and :class:`CheckpointConfig`.

model_type ``deepseek_v2`` (DeepSeek-V2, V2-Lite, V2.5), ``deepseek_v3``
(DeepSeek-V3, R1, V3.1) and ``deepseek_v32`` (DeepSeek-V3.2, with the lightning
indexer), with the meaning transformers gives each field. Fields that a model
does not use may be absent, and so may those whose default is the same for
every model type; the others must be given. A field whose value the code
does not implement is refused with a :class:`CheckpointError` naming it,
never ignored.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

MODEL_TYPES = ("deepseek_v2", "deepseek_v3", "deepseek_v32")
# model type -> (top-k methods allowed, the default, the score function they use)
_ROUTING = {
    "deepseek_v2": (("greedy", "group_limited_greedy"), "greedy", "softmax"),
    "deepseek_v3": (("noaux_tc",), "noaux_tc", "sigmoid"),
    "deepseek_v32": (("noaux_tc",), "noaux_tc", "sigmoid"),
}
FP8_BLOCK = (128, 128)


class CheckpointError(ValueError):
    """A checkpoint directory that cannot be loaded; the message is one line saying why."""


@dataclasses.dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding of the ``qk_rope_head_dim`` channels: plain, or YaRN-scaled
    (DeepSeek's long-context extension), as transformers computes it."""

    theta: float = 10000.0
    type: str = "default"  # "default" or "yarn"
    factor: float = 1.0
    original_max_position_embeddings: int = 4096
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float | None = None
    mscale_all_dim: float | None = None
    attention_factor: float | None = None  # multiplies cos and sin; inferred from the mscales when None
    truncate: bool = True

    def cos_sin_factor(self) -> float:
        """The factor on cos and sin (YaRN's attention factor; 1 for plain RoPE)."""
        if self.type == "default":
            return 1.0
        if self.attention_factor is not None:
            return self.attention_factor
        if self.mscale and self.mscale_all_dim:
            return yarn_mscale(self.factor, self.mscale) / yarn_mscale(self.factor, self.mscale_all_dim)
        return yarn_mscale(self.factor)

    def softmax_factor(self) -> float:
        """The factor on the softmax scale: YaRN's ``mscale(factor, mscale_all_dim)`` squared."""
        if self.type == "default" or not self.mscale_all_dim:
            return 1.0
        return yarn_mscale(self.factor, self.mscale_all_dim) ** 2


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    """What config.json says about the model, with transformers' meaning; the
    fields keep config.json's names (``moe_layers``, ``rope``, ``eos_token_ids``
    and ``fp8`` are read from the fields noted at them).

    The routing: ``scoring_func`` turns the router's logits into scores
    (softmax, or sigmoid with a per-expert ``e_score_correction_bias`` added for
    the choice only: ``topk_method`` "noaux_tc"); with "group_limited_greedy"
    and "noaux_tc" a token's experts come from the ``topk_group`` best of
    ``n_group`` groups (a group's score: its best score, or with "noaux_tc" the
    sum of its best two); the weights are the chosen scores, normalised to sum
    to one with ``norm_topk_prob``, times ``routed_scaling_factor``.
    """

    model_type: str
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    q_lora_rank: int | None
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    intermediate_size: int
    moe_intermediate_size: int
    n_routed_experts: int
    n_shared_experts: int
    num_experts_per_tok: int
    n_group: int
    topk_group: int
    topk_method: str
    scoring_func: str
    norm_topk_prob: bool
    routed_scaling_factor: float
    moe_layers: tuple[bool, ...]  # per layer: MoE, or a dense MLP
    rms_norm_eps: float
    rope: RopeConfig
    rope_interleave: bool  # RoPE on consecutive channel pairs (else on the two halves)
    max_position_embeddings: int
    tie_word_embeddings: bool
    eos_token_ids: tuple[int, ...]
    fp8: bool  # weights in FP8 128x128 blocks (quantization_config)
    index_n_heads: int = 0  # the lightning indexer (deepseek_v32 only)
    index_head_dim: int = 0
    index_topk: int = 0

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def softmax_scale(self) -> float:
        return self.qk_head_dim**-0.5 * self.rope.softmax_factor()

    @property
    def has_indexer(self) -> bool:
        return self.model_type == "deepseek_v32"

    @property
    def max_seq_len(self) -> int:
        """The longest sequence the paged cache may hold (the model's positions)."""
        return self.max_position_embeddings

    @property
    def num_moe_layers(self) -> int:
        return sum(self.moe_layers)


def parse_config(raw: dict[str, Any]) -> CheckpointConfig:
    """Read a config.json's contents; raise :class:`CheckpointError` naming the
    first missing, malformed or unsupported field."""
    if not isinstance(raw, dict):
        raise CheckpointError("config.json must hold a JSON object")
    model_type = raw.get("model_type")
    if model_type not in MODEL_TYPES:
        known = ", ".join(MODEL_TYPES)
        if isinstance(model_type, str) and model_type.startswith("deepseek_v4"):
            raise CheckpointError(f"model_type {model_type!r} (DeepSeek-V4) is not supported; supported: {known}")
        raise CheckpointError(f"model_type {model_type!r} is not supported; supported: {known}")
    fields = _Fields(raw)
    _refuse_unsupported(fields)
    num_layers = fields.int("num_hidden_layers")
    heads = fields.int("num_attention_heads")
    kv_heads = fields.optional("num_key_value_heads", None)
    if kv_heads is not None and kv_heads != heads:
        raise CheckpointError(f"num_key_value_heads {kv_heads} is not supported: MLA needs it equal to num_attention_heads ({heads})")
    moe_layers = _moe_layers(fields, model_type, num_layers)
    methods, default_method, scoring = _ROUTING[model_type]
    topk_method = fields.optional("topk_method", default_method)
    if topk_method not in methods:
        raise CheckpointError(f"topk_method {topk_method!r} is not supported for {model_type}; supported: {', '.join(methods)}")
    scoring_func = fields.optional("scoring_func", scoring)
    if scoring_func != scoring:
        raise CheckpointError(f"scoring_func {scoring_func!r} is not supported for {model_type}; {model_type} scores with {scoring}")
    norm_topk_prob = bool(fields.optional("norm_topk_prob", False) if model_type == "deepseek_v2" else fields.required("norm_topk_prob"))
    if model_type == "deepseek_v2" and norm_topk_prob:
        raise CheckpointError("norm_topk_prob true is not supported for deepseek_v2 (transformers' DeepseekV2 ignores it)")
    routed = fields.int("n_routed_experts") if any(moe_layers) else 0
    topk = fields.int("num_experts_per_tok") if any(moe_layers) else 0
    grouped = topk_method != "greedy"
    n_group = fields.int("n_group") if grouped else 1
    topk_group = fields.int("topk_group") if grouped else 1
    if routed:
        if routed % n_group:
            raise CheckpointError(f"n_routed_experts ({routed}) must be divisible by n_group ({n_group})")
        if not 1 <= topk_group <= n_group:
            raise CheckpointError(f"topk_group ({topk_group}) must be in [1, n_group={n_group}]")
        if topk > topk_group * (routed // n_group):
            raise CheckpointError(f"num_experts_per_tok ({topk}) exceeds the experts of topk_group groups ({topk_group * routed // n_group})")
    rope_dim = fields.int("qk_rope_head_dim")
    if rope_dim % 2:
        raise CheckpointError(f"qk_rope_head_dim must be even; got {rope_dim}")
    max_positions = fields.int("max_position_embeddings")
    q_lora_rank = fields.required("q_lora_rank")  # null: queries projected directly
    if q_lora_rank is not None:
        q_lora_rank = fields.int("q_lora_rank")
    elif model_type == "deepseek_v32":
        raise CheckpointError("q_lora_rank null is not supported for deepseek_v32 (its indexer reads the low-rank queries)")
    indexer = {}
    if model_type == "deepseek_v32":
        indexer = {name: fields.int(name, default) for name, default in (("index_n_heads", 64), ("index_head_dim", 128), ("index_topk", 2048))}
        if indexer["index_head_dim"] < rope_dim:
            raise CheckpointError(f"index_head_dim ({indexer['index_head_dim']}) must be >= qk_rope_head_dim ({rope_dim})")
    return CheckpointConfig(
        model_type=model_type,
        vocab_size=fields.int("vocab_size"),
        hidden_size=fields.int("hidden_size"),
        num_hidden_layers=num_layers,
        num_attention_heads=heads,
        q_lora_rank=q_lora_rank,
        kv_lora_rank=fields.int("kv_lora_rank"),
        qk_nope_head_dim=fields.int("qk_nope_head_dim"),
        qk_rope_head_dim=rope_dim,
        v_head_dim=fields.int("v_head_dim"),
        intermediate_size=fields.int("intermediate_size") if not all(moe_layers) else 0,
        moe_intermediate_size=fields.int("moe_intermediate_size") if any(moe_layers) else 0,
        n_routed_experts=routed,
        n_shared_experts=fields.int("n_shared_experts", 0, minimum=0) if any(moe_layers) else 0,  # null: none
        num_experts_per_tok=topk,
        n_group=n_group,
        topk_group=topk_group,
        topk_method=topk_method,
        scoring_func=scoring_func,
        norm_topk_prob=norm_topk_prob,
        routed_scaling_factor=fields.float("routed_scaling_factor", None),
        moe_layers=moe_layers,
        rms_norm_eps=fields.float("rms_norm_eps", 1e-6),
        rope=_rope(fields, max_positions),
        rope_interleave=model_type != "deepseek_v3" or bool(fields.optional("rope_interleave", True)),
        max_position_embeddings=max_positions,
        tie_word_embeddings=bool(fields.optional("tie_word_embeddings", False)),
        eos_token_ids=_eos_ids(fields.optional("eos_token_id", None)),
        fp8=_is_fp8(fields.optional("quantization_config", None)),
        **indexer,
    )


class _Fields:
    """config.json's values with type checks that raise one-line CheckpointErrors."""

    def __init__(self, raw: dict[str, Any]):
        self.raw = raw

    def optional(self, name: str, default: Any) -> Any:
        value = self.raw.get(name)
        return default if value is None else value

    def required(self, name: str) -> Any:
        """A field that must be present (transformers' default differs between
        model types, or null has a meaning of its own); its value may be null."""
        if name not in self.raw:
            raise CheckpointError(f"config.json lacks {name}")
        return self.raw[name]

    def int(self, name: str, default: int | None = None, *, minimum: int = 1) -> int:
        value = self.optional(name, default)
        if value is None:
            raise CheckpointError(f"config.json lacks {name}")
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise CheckpointError(f"config.json: {name} must be an integer >= {minimum}; got {value!r}")
        return value

    def float(self, name: str, default: float | None) -> float:
        value = self.optional(name, default)
        if value is None:
            raise CheckpointError(f"config.json lacks {name}")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            raise CheckpointError(f"config.json: {name} must be a positive number; got {value!r}")
        return float(value)


def _refuse_unsupported(fields: _Fields) -> None:
    act = fields.optional("hidden_act", "silu")
    if act != "silu":
        raise CheckpointError(f"hidden_act {act!r} is not supported (DeepSeek models use silu)")
    for name in ("attention_bias", "mlp_bias"):
        if fields.optional(name, False):
            raise CheckpointError(f"{name} true is not supported (no DeepSeek checkpoint has biases in its projections)")


def _moe_layers(fields: _Fields, model_type: str, num_layers: int) -> tuple[bool, ...]:
    """Which layers are MoE: V3.2's mlp_layer_types if given, else DeepSeek's rule
    (from first_k_dense_replace on, every moe_layer_freq-th layer)."""
    types = fields.optional("mlp_layer_types", None) if model_type == "deepseek_v32" else None
    if types is not None:
        if not isinstance(types, list) or len(types) != num_layers or any(t not in ("dense", "sparse") for t in types):
            raise CheckpointError(f"config.json: mlp_layer_types must list 'dense' or 'sparse' for each of the {num_layers} layers")
        return tuple(t == "sparse" for t in types)
    first_dense = fields.int("first_k_dense_replace", minimum=0)
    frequency = fields.int("moe_layer_freq", 1)
    return tuple(layer >= first_dense and layer % frequency == 0 for layer in range(num_layers))


def _rope(fields: _Fields, max_positions: int) -> RopeConfig:
    """rope_parameters (transformers 5), or rope_theta and rope_scaling (the published configs)."""
    params = fields.optional("rope_parameters", None)
    if params is None:
        params = dict(fields.optional("rope_scaling", None) or {})
        params.setdefault("rope_theta", fields.optional("rope_theta", 10000.0))
    if not isinstance(params, dict):
        raise CheckpointError("config.json: rope_parameters must be an object")
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in ("default", "yarn"):
        raise CheckpointError(f"rope type {rope_type!r} is not supported; supported: default, yarn")
    theta = _Fields(params).float("rope_theta", 10000.0)
    if rope_type == "default":
        return RopeConfig(theta=theta)
    yarn = _Fields(params)
    factor = params.get("factor")
    if factor is None:
        factor = max_positions / yarn.int("original_max_position_embeddings", max_positions)
    return RopeConfig(
        theta=theta,
        type="yarn",
        factor=_Fields({"factor": factor}).float("factor", 1.0),
        original_max_position_embeddings=yarn.int("original_max_position_embeddings", max_positions),
        beta_fast=yarn.float("beta_fast", 32.0),
        beta_slow=yarn.float("beta_slow", 1.0),
        mscale=params.get("mscale"),
        mscale_all_dim=params.get("mscale_all_dim"),
        attention_factor=params.get("attention_factor"),
        truncate=bool(params.get("truncate", True)),
    )


def _eos_ids(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    values = value if isinstance(value, list) else [value]
    if any(isinstance(v, bool) or not isinstance(v, int) for v in values):
        raise CheckpointError(f"config.json: eos_token_id must be an integer or a list of them; got {value!r}")
    return tuple(values)


def _is_fp8(quantization: Any) -> bool:
    """Whether ``quantization_config`` asks for DeepSeek's FP8 blocks; refuse any other scheme."""
    if quantization is None:
        return False
    if not isinstance(quantization, dict):
        raise CheckpointError("config.json: quantization_config must be an object")
    expected = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic"}
    for name, value in expected.items():
        got = quantization.get(name, value if name != "quant_method" else None)
        if got != value:
            raise CheckpointError(f"quantization_config {name} {got!r} is not supported; supported: {value!r}")
    block = quantization.get("weight_block_size", list(FP8_BLOCK))
    if list(block) != list(FP8_BLOCK):
        raise CheckpointError(f"quantization_config weight_block_size {block} is not supported; supported: [128, 128]")
    return True
