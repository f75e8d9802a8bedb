"""Tiny random DeepSeek checkpoints, built with Hugging Face transformers' own
model classes and saved with ``save_pretrained``: what the tests and
``python -m dsinfra bench models`` load, and the reference they compare with.

    from dsinfra.testing.checkpoints import save_tiny_checkpoint
    path = save_tiny_checkpoint("ckpt", "deepseek_v3", seed=0)                  # fp32, one file
    save_tiny_checkpoint("ckpt-fp8", "deepseek_v3", seed=0, fp8=True)          # FP8 128x128 blocks
    save_tiny_checkpoint("ckpt-sharded", "deepseek_v3", seed=0, max_shard_size="40KB")
    reference = load_reference(path)                                           # transformers' model

Weights are drawn so that the model does something: linear layers scaled by
``1/sqrt(fan_in)`` (activations stay O(1) through the layers), router weights
and V3's score-correction biases spread so that tokens pick different experts
and groups, norms near one. Needs ``transformers`` (and ``safetensors``).
"""

from __future__ import annotations

import json
import math
import os

import torch

# Small shapes per model type, in transformers' config fields. hidden 160 makes
# the FP8 copies' 128x128 blocks and 1x128 activation groups straddle a boundary.
_COMMON = dict(
    vocab_size=256,
    hidden_size=160,
    intermediate_size=192,
    moe_intermediate_size=64,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=4,
    kv_lora_rank=64,
    qk_nope_head_dim=32,
    qk_rope_head_dim=16,
    v_head_dim=32,
    n_routed_experts=8,
    num_experts_per_tok=3,
    first_k_dense_replace=1,
    max_position_embeddings=256,
    bos_token_id=0,
    eos_token_id=1,
    tie_word_embeddings=False,
)
_V3 = dict(_COMMON, q_lora_rank=48, n_shared_experts=1, n_group=4, topk_group=2, norm_topk_prob=True, routed_scaling_factor=2.5)
TINY_CONFIGS = {
    # V2-Lite's shape of routing: softmax scores, no low-rank queries, 2 shared experts
    "deepseek_v2": dict(
        _COMMON,
        q_lora_rank=None,
        n_shared_experts=2,
        topk_method="group_limited_greedy",
        n_group=4,
        topk_group=2,
        routed_scaling_factor=1.5,
        rope_parameters=dict(
            rope_type="yarn", rope_theta=10000.0, factor=4.0, original_max_position_embeddings=64,
            mscale=0.707, mscale_all_dim=0.707, beta_fast=32, beta_slow=1,
        ),
    ),
    # V3 / R1: sigmoid scores with correction biases, group-limited top-k, YaRN
    "deepseek_v3": dict(
        _V3,
        rope_parameters=dict(
            rope_type="yarn", rope_theta=10000.0, factor=8.0, original_max_position_embeddings=32,
            mscale=1.0, mscale_all_dim=0.8, beta_fast=32, beta_slow=1,
        ),
    ),
    # V3.2: V3 with the lightning indexer; index_topk well below the prompts' lengths. 16
    # index heads: with few, a query whose head weights are all negative scores
    # many keys exactly 0 (every relu at 0), and top-k picks among exact ties
    "deepseek_v32": dict(
        _V3,
        index_topk=6,
        index_n_heads=16,
        index_head_dim=32,
        rope_parameters=dict(rope_type="default", rope_theta=10000.0),
    ),
}


def _classes(model_type: str):
    import transformers

    names = {"deepseek_v2": "DeepseekV2", "deepseek_v3": "DeepseekV3", "deepseek_v32": "DeepseekV32"}
    if model_type not in names:
        raise ValueError(f"model_type must be one of {', '.join(names)}; got {model_type!r}")
    prefix = names[model_type]
    return getattr(transformers, f"{prefix}Config"), getattr(transformers, f"{prefix}ForCausalLM")


@torch.no_grad()
def _spread_weights(model: torch.nn.Module, seed: int) -> None:
    """Redraw every weight (see the module doc) from a generator seeded with ``seed``."""
    generator = torch.Generator().manual_seed(seed)

    def normal(tensor: torch.Tensor, std: float, mean: float = 0.0) -> None:
        tensor.copy_(torch.randn(tensor.shape, generator=generator, dtype=torch.float32) * std + mean)

    for name, tensor in sorted(model.state_dict(keep_vars=True).items()):
        if name.endswith("e_score_correction_bias"):
            tensor.copy_((torch.rand(tensor.shape, generator=generator) - 0.5) * 0.4)
        elif name.endswith(("norm.weight", "layernorm.weight")):
            normal(tensor, 0.1, mean=1.0)
        elif name.endswith("norm.bias"):
            normal(tensor, 0.1)
        elif name.endswith("embed_tokens.weight"):
            normal(tensor, 1.0)
        elif name.endswith("gate.weight"):  # the router: scores spread over the experts
            normal(tensor, 2.0 / math.sqrt(tensor.shape[-1]))
        elif tensor.dim() >= 2:  # linear layers and stacked experts: [..., out, in]
            normal(tensor, 1.0 / math.sqrt(tensor.shape[-1]))


def tiny_config(model_type: str, **overrides):
    """transformers' config object of the tiny model of ``model_type``."""
    config_class, _ = _classes(model_type)
    return config_class(**{**TINY_CONFIGS[model_type], **overrides})


def build_tiny_model(model_type: str, *, seed: int = 0, dtype: torch.dtype = torch.float32, **overrides):
    """transformers' ``...ForCausalLM`` of ``model_type`` with tiny shapes and seeded weights, in eval mode."""
    _, model_class = _classes(model_type)
    config = tiny_config(model_type, **overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_class(config)
    _spread_weights(model, seed)
    return model.to(dtype).eval()


def save_tiny_checkpoint(
    path: str | os.PathLike,
    model_type: str,
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    fp8: bool = False,
    max_shard_size: str | None = None,
    **overrides,
) -> str:
    """Build :func:`build_tiny_model` and save it into ``path`` with ``save_pretrained``
    (sharded with ``max_shard_size``). With ``fp8``, rewrite it as DeepSeek publishes
    FP8 checkpoints: every linear weight of the layers (attention, MLPs, experts,
    the indexer's ``wq_b`` and ``wk``) becomes ``float8_e4m3fn`` with a
    ``weight_scale_inv`` of one float32 per 128x128 block, and config.json gets
    the ``quantization_config``. Returns the path."""
    model = build_tiny_model(model_type, seed=seed, dtype=dtype, **overrides)
    kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(path, **kwargs)
    if fp8:
        quantize_checkpoint(path)
    return str(path)


def is_quantized_weight(name: str) -> bool:
    """Whether DeepSeek's FP8 checkpoints store this tensor in FP8: the weights of the
    layers' linear projections; not embeddings, norms, routers, the indexer's
    ``weights_proj`` or the output head."""
    if not name.startswith("model.layers.") or not name.endswith(".weight"):
        return False
    return not any(part in name for part in ("norm", ".mlp.gate.", "weights_proj"))


def quantize_checkpoint(path: str | os.PathLike) -> None:
    """Rewrite the safetensors files of ``path`` in place with FP8 128x128 block weights."""
    from safetensors.torch import load_file, save_file

    from dsinfra.fp8 import per_block_cast_to_fp8

    index_path = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index_path):
        with open(index_path) as f:
            index = json.load(f)
        files = sorted(set(index["weight_map"].values()))
    else:
        index, files = None, ["model.safetensors"]
    for file in files:
        tensors = load_file(os.path.join(path, file))
        for name in [n for n in tensors if is_quantized_weight(n)]:
            weight_fp8, scales = per_block_cast_to_fp8(tensors[name].float())
            tensors[name] = weight_fp8
            tensors[name + "_scale_inv"] = scales
            if index is not None:
                index["weight_map"][name + "_scale_inv"] = file
        save_file(tensors, os.path.join(path, file), metadata={"format": "pt"})
    if index is not None:
        with open(index_path, "w") as f:
            json.dump(index, f, indent=2)
    config_path = os.path.join(path, "config.json")
    with open(config_path) as f:
        config = json.load(f)
    config["quantization_config"] = {
        "quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128],
    }
    with open(config_path, "w") as f:
        json.dump(config, f, indent=2)


def load_reference(path: str | os.PathLike, *, dtype: torch.dtype | None = None):
    """transformers' own model of the checkpoint in ``path`` (not FP8), in eval mode."""
    import transformers

    kwargs = {} if dtype is None else {"dtype": dtype}
    return transformers.AutoModelForCausalLM.from_pretrained(path, **kwargs).eval()


def fp8_reference(path: str | os.PathLike, fp8_path: str | os.PathLike):
    """transformers' model of ``path`` computing what dsinfra computes for an FP8
    copy of it (:func:`quantize_checkpoint`, in ``fp8_path``), as transformers'
    FP8 path on GPUs does (DeepGEMM / Triton kernels; on a CPU transformers only
    dequantises): the FP8 weights, dequantised; the input of every quantized
    projection cast per token in 1x128 groups, but ``kv_b_proj``'s (MLA absorbs
    that weight, dequantised, as DeepSeek's inference does); each expert
    projection's output rounded to bf16 (DeepGEMM's grouped GEMMs write bf16)."""
    from safetensors import safe_open

    from dsinfra.fp8 import per_block_cast_back, per_token_cast_back, per_token_cast_to_fp8

    model = load_reference(path)
    model.config._experts_implementation = "eager"  # its loop over experts calls F.linear, cast below

    def cast(x: torch.Tensor) -> torch.Tensor:
        return per_token_cast_back(*per_token_cast_to_fp8(x), x.dtype)

    quantized_linears = set()
    files = [f for f in os.listdir(fp8_path) if f.endswith(".safetensors")]
    with torch.no_grad():
        for file in files:
            with safe_open(os.path.join(fp8_path, file), framework="pt") as f:
                for name in f.keys():
                    if not name.endswith("_scale_inv"):
                        continue
                    weight_name = name[: -len("_scale_inv")]
                    weight = per_block_cast_back(f.get_tensor(weight_name), f.get_tensor(name), torch.float32)
                    parts = weight_name.split(".")
                    if ".mlp.experts." in weight_name:  # model.layers.L.mlp.experts.E.{gate,up,down}_proj.weight
                        experts = model.get_submodule(".".join(parts[:5]))
                        expert, projection = int(parts[5]), parts[6]
                        inter = experts.intermediate_dim
                        if projection == "down_proj":
                            experts.down_proj[expert].copy_(weight)
                        else:
                            rows = slice(0, inter) if projection == "gate_proj" else slice(inter, 2 * inter)
                            experts.gate_up_proj[expert, rows].copy_(weight)
                        quantized_linears.add(".".join(parts[:5]))
                    else:
                        model.get_parameter(weight_name).copy_(weight)
                        quantized_linears.add(".".join(parts[:-1]))
    linear = torch.nn.functional.linear

    def expert_linear(x, weight, bias=None):
        return linear(cast(x), weight, bias).to(torch.bfloat16).to(x.dtype)

    for name in quantized_linears:
        module = model.get_submodule(name)
        if name.endswith("kv_b_proj"):
            continue
        if isinstance(module, torch.nn.Linear):
            module.register_forward_pre_hook(lambda _module, args: (cast(args[0]),))
        else:  # the experts' loop calls F.linear on each expert's rows: swap it in for the call
            module.register_forward_pre_hook(lambda *_: setattr(torch.nn.functional, "linear", expert_linear))
            module.register_forward_hook(lambda *_: setattr(torch.nn.functional, "linear", linear))
    return model
