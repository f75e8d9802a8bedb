"""Decoding through the paged cache (FlashMLA) equals the model's full-attention
forward; serving with experts spread by an EPLB plan over expert-parallel
ranks (deep_ep low-latency mode) equals serving without the plan."""

import dataclasses

import torch

from dsinfra.eplb import rebalance_experts
from dsinfra.models import ModelArgs, SortTask, Transformer
from dsinfra.models.serving import full_attention_logits, generate, serve_expert_parallel
from dsinfra.testing import calc_diff, skewed_loads, spawn
from tests.models.test_training import ARGS

ANSWERED = [0, 9, 4, 30]  # prompts of 41 to 71 tokens: one crosses a 64-token cache block


def _prompts(model, answered, step=0):
    return [prompt for prompt, _ in SortTask(model.args.vocab_size, 40, 1).requests(answered, step)]


def _model(seed=0):
    args = dataclasses.replace(ARGS, dim=128, max_seq_len=96)  # low-latency FP8 dispatch needs hidden % 128 == 0
    return Transformer(args, seed=seed).eval()


def test_decoding_through_the_paged_cache_equals_full_attention():
    model = _model()
    prompts = _prompts(model, ANSWERED)
    generation = generate(model, prompts, 6)
    assert generation.tokens.shape == (4, 6)
    expected = full_attention_logits(model, generation)
    # the cache and FlashMLA's inputs are bf16; everything else float32
    assert calc_diff(generation.logits, expected) < 1e-4
    assert torch.equal(generation.logits.argmax(-1), expected.argmax(-1))


def _serve(rank, world_size, group, plan):
    model = _model()
    prompts = _prompts(model, ANSWERED[rank::2], step=rank)
    dispatchers = serve_expert_parallel(model, group, plan, max_tokens=80)
    generation = generate(model, prompts, 4)
    return generation.logits, [d.loads.tolist() for d in dispatchers], [d.loads_in_order.tolist() for d in dispatchers]


def test_serving_with_an_eplb_plan_gives_the_same_results():
    num_moe = ARGS.n_layers - ARGS.n_dense_layers
    plan = rebalance_experts(skewed_loads(num_moe, ARGS.n_routed_experts, seed=0, skew=1.5), 12, ARGS.n_expert_groups, 1, 2)
    in_order = spawn(_serve, 2, None)
    balanced = spawn(_serve, 2, plan)
    for rank in range(2):
        logits, loads, _ = in_order[rank]
        planned_logits, planned_loads, planned_in_order = balanced[rank]
        # replicas are copies of their experts: only the order of the bf16 sums in combine changes
        assert calc_diff(planned_logits, logits) < 1e-5
        assert planned_in_order == loads  # what the in-order placement counts is what it sent
        assert sum(map(sum, planned_loads)) == sum(map(sum, loads))  # every (token, expert) pair arrives once
