"""Greedy generation with tiny DeepSeek-V2 / V3 / V3.2 checkpoints against transformers' own generate: tokens/s at batch 1 and 8.

Each model is the tests' tiny one (dsinfra.testing.checkpoints: 3 layers,
hidden 160, 4 heads, 8 routed experts, float32), saved with transformers'
``save_pretrained`` and loaded both ways: ``dsinfra.models.load_pretrained``
then ``model.generate`` (one packed prefill, then decoding through the paged
latent cache with FlashMLA, experts through grouped GEMMs), and
``AutoModelForCausalLM.from_pretrained`` then ``generate(do_sample=False)``
(the prompts left-padded into one batch, its DynamicCache expanding every
cached latent into per-head keys and values at each step). Both get the same
seeded prompts (CPU: 256 to 512 tokens; GPU: 1024 to 2048) and generate the
same number of new tokens with no end token.

One more case runs the V3 model with the attention of DeepSeek's own models
(16 heads of V2-Lite's MLA widths: kv_lora_rank 512, qk_nope_head_dim 128,
qk_rope_head_dim 64, v_head_dim 128; hidden 512), batch 8: where the paged
latent cache (576 values a token) has far less to read than a per-head one
(16 x 320), while the tiny models' 4 narrow heads cost per-op overhead only.

Per case: ``time_s`` is dsinfra's generate, ``baseline_time_s`` transformers';
``tokens_per_s`` counts new tokens over the whole call (prefill included), and
``decode_tokens_per_s`` the tokens after the first over the time beyond a
one-token call (decoding alone). ``identical``: the prompts whose new tokens
are the same both ways; for any other, ``gap_at_difference`` is the gap
between transformers' two best logits where the two first differ (the
largest over those prompts): small, a near-tie, where rounding decides.
"""

from __future__ import annotations

import tempfile

import torch

MODEL_TYPES = ("deepseek_v2", "deepseek_v3", "deepseek_v32")
BATCHES = (1, 8)
# DeepSeek-V2-Lite's attention widths on the tiny V3 model (see the module's docstring).
DEEPSEEK_MLA = dict(
    num_attention_heads=16, num_key_value_heads=16, kv_lora_rank=512, qk_nope_head_dim=128,
    qk_rope_head_dim=64, v_head_dim=128, hidden_size=512,
)
# (model type, config overrides, batches, what the case name adds)
CASES = (
    *((model_type, {}, BATCHES, "") for model_type in MODEL_TYPES),
    ("deepseek_v3", DEEPSEEK_MLA, (8,), ", 16 heads of DeepSeek's MLA widths"),
)


def _sizes(ctx) -> dict:
    if ctx.quick:
        return {"prompt": (8, 16), "new_tokens": 4, "repeats": 1}
    if ctx.device.type == "cuda":
        return {"prompt": (1024, 2048), "new_tokens": 64, "repeats": min(ctx.repeats, 3)}
    return {"prompt": (256, 512), "new_tokens": 32, "repeats": min(ctx.repeats, 3)}


def _prompts(batch: int, lengths: tuple[int, int], vocab: int, seed: int) -> list[list[int]]:
    from dsinfra.testing import generator

    g = generator(seed)
    sizes = torch.randint(lengths[0], lengths[1] + 1, (batch,), generator=g).tolist()
    return [torch.randint(2, vocab, (size,), generator=g).tolist() for size in sizes]


def _gap_at_first_difference(model, prompts, ours, theirs) -> float | None:
    """The largest gap between the reference's two best logits at the first
    token where ``ours`` and ``theirs`` differ, over the prompts where they do."""
    gaps = []
    for prompt, a, b in zip(prompts, ours, theirs):
        first = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
        if first is not None:
            with torch.no_grad():
                logits = model(torch.tensor([prompt + b[:first]], device=model.device)).logits[0, -1].float()
            best_two = logits.topk(2).values
            gaps.append(float(best_two[0] - best_two[1]))
    return max(gaps) if gaps else None


class _Transformers:
    """transformers' batched greedy generate over left-padded prompts."""

    def __init__(self, model, prompts: list[list[int]], device: torch.device):
        longest = max(len(p) for p in prompts)
        self.model, self.longest = model, longest
        self.ids = torch.tensor([[0] * (longest - len(p)) + p for p in prompts], device=device)
        self.mask = torch.tensor([[0] * (longest - len(p)) + [1] * len(p) for p in prompts], device=device)

    def __call__(self, new_tokens: int) -> list[list[int]]:
        out = self.model.generate(
            self.ids, attention_mask=self.mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
            do_sample=False, eos_token_id=None, pad_token_id=0,
        )
        return out[:, self.longest :].tolist()


def benchmark(ctx) -> None:
    import transformers

    from dsinfra.models import load_pretrained
    from dsinfra.testing.checkpoints import load_reference, save_tiny_checkpoint

    transformers.logging.set_verbosity_error()
    sizes = _sizes(ctx)
    new_tokens, repeats = sizes["new_tokens"], sizes["repeats"]
    with tempfile.TemporaryDirectory() as root:
        for index, (model_type, overrides, batches, label) in enumerate(CASES):
            path = save_tiny_checkpoint(f"{root}/{index}", model_type, seed=0, max_position_embeddings=4096, **overrides)
            ours = load_pretrained(path, device=ctx.device)
            theirs = load_reference(path).to(ctx.device)
            for batch in batches:
                prompts = _prompts(batch, sizes["prompt"], ours.config.vocab_size, seed=batch)
                baseline = _Transformers(theirs, prompts, ctx.device)

                def generate(count: int):
                    return ours.generate(prompts, count, eos_token_id=())

                ours_ids, theirs_ids = generate(new_tokens), baseline(new_tokens)
                same = sum(a == b for a, b in zip(ours_ids, theirs_ids))
                gap = _gap_at_first_difference(theirs, prompts, ours_ids, theirs_ids)
                times = {}
                for name, fn in (("ours", generate), ("theirs", baseline)):
                    full = ctx.time(lambda: fn(new_tokens), repeats=repeats, warmup=1)
                    first = ctx.time(lambda: fn(1), repeats=repeats, warmup=0)
                    times[name] = (full, first)
                (full, first), (base_full, base_first) = times["ours"], times["theirs"]
                decoded = batch * (new_tokens - 1)
                ctx.record(
                    f"{model_type} batch {batch}{label}",
                    time_s=full.median,
                    min_time_s=full.min,
                    baseline="transformers generate",
                    baseline_time_s=base_full.median,
                    params={"batch": batch, "prompt_tokens": [len(p) for p in prompts], "new_tokens": new_tokens, "dtype": "float32"},
                    extra={
                        "tokens_per_s": batch * new_tokens / full.median,
                        "transformers_tokens_per_s": batch * new_tokens / base_full.median,
                        "decode_tokens_per_s": decoded / max(full.median - first.median, 1e-9),
                        "transformers_decode_tokens_per_s": decoded / max(base_full.median - base_first.median, 1e-9),
                        "identical": f"{same}/{batch}",
                        "gap_at_difference": gap,
                    },
                )
