"""The demo on one rank: train, balance, serve, check, and (rank 0) write the outputs.

Every rank runs :func:`run_rank`, whether started by ``python -m dsinfra demo``
(through :func:`dsinfra.testing.spawn`) or by ``torchrun``:

1. training: the pp x ep grid of :mod:`dsinfra.models.training` (DualPipeV,
   deep_ep, FP8 experts through deep_gemm), expert loads recorded by an
   :class:`dsinfra.eplb.ExpertLoadRecorder`;
2. balancing: every rank plans the same replication from the loads summed over
   all ranks (:func:`dsinfra.eplb.rebalance_experts`);
3. serving: the first ``ep`` ranks place the experts by the plan and generate
   for batches of requests of different lengths through FlashMLA and deep_ep's
   low-latency mode, then check every chosen token's logits against the
   model's own full-attention forward.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time

import torch
import torch.distributed as dist

from dsinfra.demo import outputs
from dsinfra.models.serving import full_attention_logits, generate, serve_expert_parallel
from dsinfra.models.training import TrainConfig, Trainer, build_model, global_state
from dsinfra.testing import calc_diff


@dataclasses.dataclass(frozen=True)
class DemoOptions:
    train: TrainConfig
    out: str
    redundant_experts: int = 4  # EPLB's extra slots (replicas) per MoE layer
    load_window: int = 50  # EPLB plans from the expert loads of the last this many steps
    requests_per_rank: int = 6
    new_tokens: int = 8  # enough to finish every request's sort (sort_length)
    trace_step: int = 2  # the training step traced with torch.profiler (the last one in shorter runs)


def _gather(value, group=None) -> list:
    values = [None] * dist.get_world_size(group)
    dist.all_gather_object(values, value, group=group)
    return values


def run_rank(rank: int, world_size: int, group, options: DemoOptions) -> dict | None:
    """This rank's part of the demo; rank 0 returns the summary."""
    config = options.train
    from dsinfra.eplb import ExpertLoadRecorder

    num_moe_layers = config.args.n_layers - config.args.n_dense_layers
    recorder = ExpertLoadRecorder(num_moe_layers, config.args.n_routed_experts, window=options.load_window)
    trainer = Trainer(config, rank, recorder=recorder)
    losses, step_seconds = _train(trainer, recorder, options, rank)
    # everything the later phases need, on every rank
    mine = global_state(trainer.stages, trainer.model, config, trainer.grid)
    state = {}
    for shard in _gather({name: t.detach().cpu() for name, t in mine.items()}):
        state.update(shard)
    loads = recorder.weight(group).cpu()  # summed over all ranks: every layer, the whole batch
    executed = _gather([(i.op, i.start, i.end) for i in trainer.pipe.executed]) if trainer.pipe.executed else None
    del trainer

    from dsinfra.eplb import gpu_loads, imbalance, in_order_gpu_loads, rebalance_experts

    num_slots = config.args.n_routed_experts + options.redundant_experts
    plan = rebalance_experts(loads, num_slots, config.args.n_expert_groups, 1, config.ep)
    planned = {
        "before": imbalance(in_order_gpu_loads(loads, config.ep)).tolist(),
        "after": imbalance(gpu_loads(loads, plan[0], config.ep)).tolist(),
    }

    serving_ranks = list(range(config.ep))
    serving_group = dist.new_group(serving_ranks)
    served = _serve(state, plan, serving_group, options, rank) if rank in serving_ranks else None
    summaries = _gather(served)
    if rank != 0:
        return None
    return outputs.write_all(
        options,
        losses=losses,
        step_seconds=step_seconds,
        loads=loads,
        plan=plan,
        planned_imbalance=planned,
        served=[s for s in summaries if s is not None],
        executed=executed,
    )


def _train(trainer: Trainer, recorder, options: DemoOptions, rank: int) -> tuple[list[float], list[float]]:
    config = options.train
    losses, seconds = [], []
    for step in range(config.steps):
        start = time.perf_counter()
        if rank == 0 and step == min(options.trace_step, config.steps - 1):
            loss = outputs.profiled(lambda: trainer.step(step), os.path.join(options.out, "trace_train_step.json"))
        else:
            loss = trainer.step(step)
        recorder.step()
        seconds.append(time.perf_counter() - start)
        if loss is not None:
            losses.append(loss)
        if rank == 0:
            outputs.progress(step + 1, config.steps, loss, seconds)
    if rank == 0:
        print(file=sys.stderr)
    return losses, seconds


def _serve(state: dict, plan, group, options: DemoOptions, rank: int) -> dict:
    """Generate on this serving rank with the experts placed by ``plan``;
    check against the full-attention forward; report loads."""
    config = options.train
    model = build_model(config)
    model.load_state_dict(state)
    model.eval()
    task = config.task()
    # requests at different points of their answers: prompts of different lengths
    answered = [(3 * i + rank) % config.sort_length for i in range(options.requests_per_rank)]
    requests = task.requests(answered, step=10**6 + rank)
    prompts = [prompt.to(model.embed.weight.device) for prompt, _ in requests]
    reference = build_model(config)
    reference.load_state_dict(state)
    reference.eval()

    max_tokens = max(max(len(p) for p in prompts), options.requests_per_rank)
    max_tokens = _gather(max_tokens, group)
    dispatchers = serve_expert_parallel(model, group, plan, max(max_tokens))

    def hook(step, run):
        if rank == 0 and step == 1:
            return outputs.profiled(run, os.path.join(options.out, "trace_decode_step.json"))
        return run()

    start = time.perf_counter()
    generation = generate(model, prompts, options.new_tokens, step_hook=hook)
    seconds = time.perf_counter() - start
    expected = full_attention_logits(reference, generation)
    agree = (expected.argmax(-1) == generation.tokens).float().mean().item()
    correct = [generation.tokens[i, : len(c)].equal(c) for i, (_, c) in enumerate(requests)]

    loads = torch.stack([d.loads for d in dispatchers])
    loads_in_order = torch.stack([d.loads_in_order for d in dispatchers])
    dist.all_reduce(loads, group=group)
    dist.all_reduce(loads_in_order, group=group)
    return {
        "rank": rank,
        "prompts": [p.tolist() for p in generation.prompts],
        "generated": generation.tokens.tolist(),
        "sorted_correctly": sum(correct),
        "logits_calc_diff": calc_diff(generation.logits, expected),
        "token_agreement": agree,
        "seconds": seconds,
        "rank_loads_in_order": loads_in_order.tolist(),  # [moe layer][rank]
        "rank_loads_balanced": loads.tolist(),
    }
