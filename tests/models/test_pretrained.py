"""Loaded checkpoints against transformers' own DeepseekV2 / V3 / V32 classes:
logits of the full forward, and greedy generation through the paged latent
cache (FlashMLA), for bf16, fp32, FP8 and sharded checkpoints."""

import pytest
import torch

from dsinfra.models import load_pretrained
from dsinfra.testing import calc_diff
from dsinfra.testing.checkpoints import fp8_reference, load_reference

pytestmark = pytest.mark.usefixtures("one_thread")

INPUT_IDS = torch.tensor([[5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15], [25, 60, 27, 3, 29, 200, 31, 32, 7, 34, 35]])
# Three prompts of different lengths from a seeded stream. Greedy choices are
# compared token for token, so the prompts are ones whose continuations have
# no near-tie (checked below): where the two best logits (or two experts'
# routing scores) are within rounding distance, two correct implementations may
# pick differently; bf16 and FP8 computations move logits by up to ~0.1.
PROMPTS = [
    [130, 246, 251, 146, 28, 179, 209, 82, 134, 100, 183, 87, 105],
    [182, 95, 47, 11, 154, 255, 51, 109, 167],
    [106, 147, 231, 100, 114, 91, 93, 204],
]
NEW_TOKENS = 6
SMALLEST_MARGIN = 0.01  # between the reference's best and second-best logit along its greedy path


def reference_generate(reference, prompts, new_tokens):
    """transformers' greedy generate(do_sample=False), one prompt at a time, and the
    smallest gap between its two best logits along the way."""
    outputs, margin = [], float("inf")
    for prompt in prompts:
        ids = reference.generate(torch.tensor([prompt]), max_new_tokens=new_tokens, do_sample=False, eos_token_id=None)
        outputs.append(ids[0, len(prompt):].tolist())
        with torch.no_grad():
            logits = reference(ids).logits[0, len(prompt) - 1 : -1].float()
        best_two = logits.topk(2).values
        margin = min(margin, float((best_two[:, 0] - best_two[:, 1]).min()))
    return outputs, margin


@pytest.mark.parametrize("name", ["v2", "v3", "v32"])
def test_float32_logits_equal_transformers(checkpoint, name):
    path = checkpoint(name)
    with torch.no_grad():
        expected = load_reference(path)(INPUT_IDS).logits.float()
    logits = load_pretrained(path)(INPUT_IDS)
    assert logits.shape == (2, 11, 256) and logits.dtype == torch.float32
    # the same float32 math in another order: relative errors ~1e-6, calc_diff ~1e-12
    assert calc_diff(logits, expected) < 1e-9


def test_bf16_logits_near_transformers(checkpoint):
    path = checkpoint("v3-bf16")
    with torch.no_grad():
        expected = load_reference(path)(INPUT_IDS).logits.float()
    model = load_pretrained(path)
    assert model.dtype == torch.bfloat16
    # bf16 rounds each of the ~20 operations per layer to 2^-9 relative, in a
    # different order on each side: ~1% relative error, calc_diff ~1e-4 (measured 1.4e-4)
    assert calc_diff(model(INPUT_IDS), expected) < 1e-3


def test_fp8_logits_equal_transformers_fp8_math(checkpoint, monkeypatch):
    path, fp8_path = checkpoint("v3"), checkpoint("v3-fp8")
    with torch.no_grad():
        expected = fp8_reference(path, fp8_path)(INPUT_IDS).logits.float()
    model = load_pretrained(fp8_path)
    weight = model.model.layers[1].self_attn.q_a_proj.weight
    assert weight.dtype == torch.float8_e4m3fn  # kept FP8
    assert model.model.layers[1].mlp.experts.gate_proj.dtype == torch.float8_e4m3fn
    # DeepGEMM's CPU path multiplies bf16 copies of the FP8 operands (2^-8
    # relative), and every FP8 activation cast turns such differences near a
    # rounding boundary into a whole FP8 step (2^-4): calc_diff ~1.5e-2 after
    # three layers, where skipping the FP8 casts altogether gives 2.4e-2 ...
    assert calc_diff(model(INPUT_IDS), expected) < 5e-2
    # ... so the FP8 math itself is checked with DeepGEMM's exact reference
    # implementation: then only float32 summation order differs.
    monkeypatch.setenv("DSINFRA_BACKEND", "reference")
    assert calc_diff(model(INPUT_IDS), expected) < 1e-9


def test_sharded_equals_unsharded(checkpoint):
    sharded = load_pretrained(checkpoint("v3-sharded"))
    whole = load_pretrained(checkpoint("v3"))
    assert torch.equal(sharded(INPUT_IDS), whole(INPUT_IDS))
    assert sharded.generate(PROMPTS, 3, block_size=8) == whole.generate(PROMPTS, 3, block_size=8)


@pytest.mark.parametrize("name", ["v2", "v3", "v32", "v3-bf16", "v3-fp8"])
def test_greedy_generation_equals_transformers(checkpoint, name, monkeypatch):
    if name == "v3-fp8":
        reference = fp8_reference(checkpoint("v3"), checkpoint(name))
        monkeypatch.setenv("DSINFRA_BACKEND", "reference")  # the FP8 math exactly (see above)
    else:
        reference = load_reference(checkpoint(name))
    expected, margin = reference_generate(reference, PROMPTS, NEW_TOKENS)
    assert margin > SMALLEST_MARGIN
    model = load_pretrained(checkpoint(name))
    assert model.generate(PROMPTS, NEW_TOKENS, eos_token_id=(), block_size=8) == expected


def test_generation_stops_at_an_end_token(checkpoint):
    model = load_pretrained(checkpoint("v3"))
    full = model.generate(PROMPTS, NEW_TOKENS, eos_token_id=())
    end = full[1][2]  # the third token of the second prompt's continuation
    stopped = model.generate(PROMPTS, NEW_TOKENS, eos_token_id=end)
    for out, ids in zip(stopped, full):
        assert out == (ids[: ids.index(end) + 1] if end in ids else ids)
    assert model.generate([PROMPTS[0]], 0) == [[]]
