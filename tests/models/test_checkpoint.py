"""Reading checkpoint directories: config.json's fields, lazy reads (a rank
reads only its experts), and every bad directory refused in one line."""

import json
import os
import shutil

import pytest
import torch

from dsinfra import cli
from dsinfra.models import CheckpointError, load_pretrained
from dsinfra.models.checkpoint import Checkpoint
from dsinfra.models.checkpoint_config import parse_config

pytestmark = pytest.mark.usefixtures("one_thread")

# DeepSeek-V3's published config.json, shrunk: rope_theta and rope_scaling (not
# transformers 5's rope_parameters), MTP layers, the FP8 quantization_config.
PUBLISHED_V3 = {
    "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", "vocab_size": 256, "hidden_size": 128,
    "intermediate_size": 192, "moe_intermediate_size": 64, "num_hidden_layers": 3, "num_nextn_predict_layers": 1,
    "num_attention_heads": 4, "num_key_value_heads": 4, "n_shared_experts": 1, "n_routed_experts": 8,
    "routed_scaling_factor": 2.5, "kv_lora_rank": 64, "q_lora_rank": 48, "qk_rope_head_dim": 16, "v_head_dim": 32,
    "qk_nope_head_dim": 32, "topk_method": "noaux_tc", "n_group": 4, "topk_group": 2, "num_experts_per_tok": 3,
    "moe_layer_freq": 1, "first_k_dense_replace": 1, "norm_topk_prob": True, "scoring_func": "sigmoid",
    "hidden_act": "silu", "max_position_embeddings": 1024, "rms_norm_eps": 1e-06, "rope_theta": 10000,
    "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0, "mscale_all_dim": 1.0,
                     "original_max_position_embeddings": 64, "type": "yarn"},
    "eos_token_id": 1, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "weight_block_size": [128, 128]},
}


def test_a_published_config_reads_with_transformers_meaning():
    config = parse_config(PUBLISHED_V3)
    assert config.fp8 and config.moe_layers == (False, True, True)
    assert config.rope.type == "yarn" and config.rope.factor == 40 and config.rope.original_max_position_embeddings == 64
    mscale = 0.1 * 1.0 * torch.log(torch.tensor(40.0)).item() + 1.0
    assert config.softmax_scale == pytest.approx(48**-0.5 * mscale**2)
    assert config.rope.cos_sin_factor() == 1.0  # mscale == mscale_all_dim
    assert (config.topk_method, config.scoring_func, config.eos_token_ids) == ("noaux_tc", "sigmoid", (1,))


@pytest.mark.parametrize(
    "change, message",
    [
        ({"model_type": "llama"}, "model_type 'llama' is not supported"),
        ({"model_type": "deepseek_v4"}, "DeepSeek-V4) is not supported"),
        ({"hidden_size": None}, "config.json lacks hidden_size"),
        ({"hidden_act": "gelu"}, "hidden_act 'gelu' is not supported"),
        ({"topk_method": "greedy"}, "topk_method 'greedy' is not supported for deepseek_v3"),
        ({"scoring_func": "softmax"}, "scoring_func 'softmax' is not supported for deepseek_v3"),
        ({"num_key_value_heads": 2}, "num_key_value_heads 2 is not supported"),
        ({"rope_scaling": {"type": "linear", "factor": 2}}, "rope type 'linear' is not supported"),
        ({"quantization_config": {"quant_method": "fp8", "weight_block_size": [64, 64]}}, "weight_block_size [64, 64] is not supported"),
        ({"quantization_config": {"quant_method": "awq"}}, "quant_method 'awq' is not supported"),
        ({"n_group": 3}, "n_routed_experts (8) must be divisible by n_group (3)"),
        ({"attention_bias": True}, "attention_bias true is not supported"),
    ],
)
def test_unsupported_fields_are_refused_by_name(change, message):
    with pytest.raises(CheckpointError, match=None) as raised:
        parse_config({**PUBLISHED_V3, **change})
    assert message in str(raised.value) and "\n" not in str(raised.value)


def test_deepseek_v2_and_v32_fields():
    v2 = parse_config({**PUBLISHED_V3, "model_type": "deepseek_v2", "topk_method": "group_limited_greedy",
                       "scoring_func": "softmax", "norm_topk_prob": False, "q_lora_rank": None})
    assert (v2.topk_method, v2.q_lora_rank, v2.rope_interleave) == ("group_limited_greedy", None, True)
    with pytest.raises(CheckpointError, match="norm_topk_prob true is not supported for deepseek_v2"):
        parse_config({**PUBLISHED_V3, "model_type": "deepseek_v2", "topk_method": "greedy", "scoring_func": "softmax"})
    v32 = parse_config({**PUBLISHED_V3, "model_type": "deepseek_v32", "index_topk": 8, "index_n_heads": 4,
                        "index_head_dim": 32, "mlp_layer_types": ["dense", "sparse", "dense"]})
    assert v32.has_indexer and v32.index_topk == 8 and v32.moe_layers == (False, True, False)


def test_expert_parallel_ranks_read_only_their_experts(checkpoint, monkeypatch):
    path = checkpoint("v3-sharded")
    read = []
    original = Checkpoint.read
    monkeypatch.setattr(Checkpoint, "read", lambda self, name, *a, **k: read.append(name) or original(self, name, *a, **k))
    model = load_pretrained(path, expert_placement=[[2, 3, 2], [6, 7, 0]])  # slots of one rank, a replica of expert 2
    experts = {name.split(".experts.")[1].split(".")[0] for name in read if ".experts." in name}
    assert experts == {"0", "2", "3", "6", "7"}
    layer1, layer2 = (moe.experts for moe in model.moe_layers())
    assert layer1.num_experts == 3 and torch.equal(layer1.gate_proj[0], layer1.gate_proj[2])
    assert not torch.equal(layer1.gate_proj[0], layer2.gate_proj[2])


def test_layers_past_the_config_are_not_read(checkpoint, tmp_path):
    """Multi-token prediction heads sit in model.layers.N, N = num_hidden_layers: never read."""
    from safetensors.torch import load_file, save_file

    path = shutil.copytree(checkpoint("v3"), tmp_path / "with-mtp")
    tensors = load_file(path / "model.safetensors")
    tensors["model.layers.3.eh_proj.weight"] = torch.zeros(4, 4)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    ids = torch.tensor([[3, 4, 5]])
    assert torch.equal(load_pretrained(path)(ids), load_pretrained(checkpoint("v3"))(ids))


def _bad_directories(source, root):
    """name -> a broken copy of the checkpoint ``source``."""
    def copy(name):
        return shutil.copytree(source, root / name)

    bad = {}
    bad["no config.json"] = copy("no-config")
    os.remove(bad["no config.json"] / "config.json")
    bad["unknown model_type"] = copy("unknown-type")
    config = json.loads((bad["unknown model_type"] / "config.json").read_text())
    (bad["unknown model_type"] / "config.json").write_text(json.dumps({**config, "model_type": "mixtral"}))
    bad["truncated shard"] = copy("truncated")
    shard = sorted(bad["truncated shard"].glob("model-*.safetensors"))[3]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    bad["missing shard"] = copy("missing")
    os.remove(sorted(bad["missing shard"].glob("model-*.safetensors"))[-1])
    bad["shape mismatch"] = copy("shapes")
    config = json.loads((bad["shape mismatch"] / "config.json").read_text())
    (bad["shape mismatch"] / "config.json").write_text(json.dumps({**config, "kv_lora_rank": 48}))
    bad["not a directory"] = root / "nowhere"
    return bad


def test_bad_directories_end_the_cli_with_one_line(checkpoint, tmp_path, capsys):
    expected = {
        "no config.json": "has no config.json",
        "unknown model_type": "model_type 'mixtral' is not supported",
        "truncated shard": "is not a readable safetensors file",
        "missing shard": "is missing",
        "shape mismatch": "kv_a_proj_with_mqa.weight has shape [80, 160] in the checkpoint; the config implies [64, 160]",
        "not a directory": "is not a directory",
    }
    bad = _bad_directories(checkpoint("v3-sharded"), tmp_path)
    capsys.readouterr()  # what saving the checkpoint printed (when this test made it)
    for name, path in bad.items():
        code = cli.main(["generate", "--model", str(path), "--prompt-ids", "1,2,3", "--max-new-tokens", "2"])
        err = capsys.readouterr().err
        assert code == 2, name
        assert err.count("\n") == 1 and expected[name] in err, (name, err)
