"""DualPipe and DualPipeV against torch.distributed.pipelining's 1F1B and DualPipeV on 4 ranks; simulator table at PP 8 and 16.

Each pipeline trains the same stack of equal MLP blocks on the same
micro-batches, in one run of four ranks (gloo on the CPU, NCCL on four GPUs):

- dsinfra DualPipe: 4 stages per direction, two per rank (so two copies of the model);
- dsinfra DualPipeV: 8 stages in a V, two per rank;
- torch Schedule1F1B: 4 stages, one per rank (the baseline of the speed-ups);
- torch ScheduleDualPipeV: 8 stages in a V, two per rank.

Every rank does the same work per step (all micro-batches through a quarter
of the blocks, forward and backward). Its bubble fraction is
``1 - compute / step``, with ``compute`` the time the rank's stages take for
that work alone, without communication, measured with all ranks computing at
once (so CPU ranks share the cores as they do in a step). The simulator's
bubble fraction for the same schedule (F = 1, B = 2, W = 1) stands beside it.
Then the simulator's bubble and memory table (DualPipe's README table) at PP =
8 and 16, as records without a time: bubbles in units of F, beside the
README's formula, peak activations and parameters per rank in stages.
"""

from __future__ import annotations

import statistics
import time

import torch
import torch.distributed as dist
from torch import nn

RANKS = 4


def _block(hidden: int, linear: type[nn.Linear]) -> nn.Module:
    return nn.Sequential(linear(hidden, 4 * hidden), nn.GELU(), linear(4 * hidden, hidden))


def _stages(num_stages: int, blocks: int, hidden: int, linear: type[nn.Linear], device, dtype) -> list[nn.Module]:
    per_stage = blocks // num_stages
    torch.manual_seed(0)
    return [nn.Sequential(*[_block(hidden, linear) for _ in range(per_stage)]).to(device, dtype) for _ in range(num_stages)]


def _loss(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return nn.functional.mse_loss(output, target)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed_steps(step, group, device, warmup: int, repeats: int) -> list[float]:
    """Seconds of each of ``repeats`` calls of ``step()``, all ranks starting together."""
    for _ in range(warmup):
        step()
    times = []
    for _ in range(repeats):
        dist.barrier(group)
        _synchronize(device)
        start = time.perf_counter()
        step()
        _synchronize(device)
        times.append(time.perf_counter() - start)
    return times


def _alone(modules: list[nn.Module], micro_batches: list[torch.Tensor], group, device, warmup: int, repeats: int) -> float:
    """Median seconds of this rank's work of one step without communication:
    every micro-batch forward and backward through each of its modules."""

    def work() -> None:
        for module in modules:
            for x in micro_batches:
                module(x.detach().requires_grad_()).sum().backward()

    return statistics.median(_timed_steps(work, group, device, warmup, repeats))


def _run_rank(rank: int, world_size: int, group, settings: dict) -> dict:
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B

    from dsinfra.dualpipe import DualPipe, DualPipeV, ZeroBubbleLinear, set_p2p_tensor_dtype, set_p2p_tensor_shapes

    device = torch.device(settings["device"], rank) if settings["device"] == "cuda" else torch.device("cpu")
    dtype, hidden, blocks, chunks = settings["dtype"], settings["hidden"], settings["blocks"], settings["chunks"]
    tokens, warmup, repeats = settings["tokens"], settings["warmup"], settings["repeats"]
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(chunks * tokens, hidden, generator=generator).to(device, dtype)
    target = torch.randn(chunks * tokens, hidden, generator=generator).to(device, dtype)
    micro = list(x.chunk(chunks))
    set_p2p_tensor_shapes([(tokens, hidden)])
    set_p2p_tensor_dtype(dtype)
    results = {}

    def measure(name: str, step, modules: list[nn.Module], micro_batches: list[torch.Tensor], recorded=None) -> None:
        times = _timed_steps(step, group, device, warmup, repeats)
        results[name] = {"times": times, "alone": _alone(modules, micro_batches, group, device, warmup=1, repeats=3)}
        if recorded is not None:  # dsinfra's own record of its compute operations in the last step
            busy = sum(i.end - i.start for i in recorded() if i.op.kind in ("F", "B", "W", "FB"))
            results[name]["recorded busy"] = busy / times[-1]

    # dsinfra DualPipe: rank r holds stage r of one direction and stage 3 - r of
    # the other, each passing half of the micro-batches.
    stages = _stages(RANKS, blocks, hidden, ZeroBubbleLinear, device, dtype)
    pipe = DualPipe([stages[rank], stages[RANKS - 1 - rank]])
    halves = {0: (x.chunk(2)[0], target.chunk(2)[1]), RANKS - 1: (x.chunk(2)[1], target.chunk(2)[0])}
    inputs, labels = halves.get(rank, (None, None))
    measure(
        "dsinfra DualPipe",
        lambda: pipe.step(inputs, num_chunks=chunks, criterion=_loss, labels=(labels,)),
        list(pipe.module),
        micro[: chunks // 2],
        lambda: pipe.executed,
    )

    # dsinfra DualPipeV: 8 stages, rank r holds stages r and 7 - r.
    stages = _stages(2 * RANKS, blocks, hidden, ZeroBubbleLinear, device, dtype)
    pipe_v = DualPipeV([stages[rank], stages[2 * RANKS - 1 - rank]])
    first = rank == 0
    measure(
        "dsinfra DualPipeV",
        lambda: pipe_v.step(x if first else None, num_chunks=chunks, criterion=_loss, labels=(target if first else None,)),
        list(pipe_v.module),
        micro,
        lambda: pipe_v.executed,
    )

    # torch.distributed.pipelining: the same blocks, plain nn.Linear.
    stages = _stages(RANKS, blocks, hidden, nn.Linear, device, dtype)
    stage = PipelineStage(stages[rank], rank, RANKS, device, group=group)
    one_f_one_b = Schedule1F1B(stage, chunks, loss_fn=_loss, scale_grads=False)
    last = rank == RANKS - 1
    measure(
        "torch Schedule1F1B",
        lambda: one_f_one_b.step(*((x,) if first else ()), **({"target": target, "losses": []} if last else {})),
        [stages[rank]],
        micro,
    )
    try:
        from torch.distributed.pipelining import ScheduleDualPipeV
    except ImportError:
        return results
    stages = _stages(2 * RANKS, blocks, hidden, nn.Linear, device, dtype)
    mine = [stages[rank], stages[2 * RANKS - 1 - rank]]
    v_stages = [PipelineStage(m, i, 2 * RANKS, device, group=group) for m, i in zip(mine, (rank, 2 * RANKS - 1 - rank))]
    torch_v = ScheduleDualPipeV(v_stages, chunks, loss_fn=_loss, scale_grads=False)
    measure(
        "torch ScheduleDualPipeV",
        lambda: torch_v.step(*((x,) if first else ()), **({"target": target, "losses": []} if first else {})),
        mine,
        micro,
    )
    return results


SIMULATED = {
    "dsinfra DualPipe": ("dualpipe", RANKS),
    "dsinfra DualPipeV": ("dualpipev", RANKS),
    "torch Schedule1F1B": ("1f1b", RANKS),
    "torch ScheduleDualPipeV": ("dualpipev", RANKS),
}


def benchmark(ctx) -> None:
    from dsinfra.dualpipe import schedule, simulator
    from dsinfra.testing import spawn

    gpu = ctx.device.type == "cuda"
    settings = {
        "device": ctx.device.type,
        "dtype": torch.bfloat16 if gpu else torch.float32,
        "hidden": (256 if ctx.quick else 1024) if gpu else (64 if ctx.quick else 128),
        "tokens": (256 if ctx.quick else 2048) if gpu else (16 if ctx.quick else 64),
        "blocks": 8 if ctx.quick else 16,
        "chunks": 8 if ctx.quick else 16,
        "warmup": 1 if ctx.quick else ctx.warmup,
        "repeats": 3 if ctx.quick else ctx.repeats,
    }
    params = {k: settings[k] for k in ("hidden", "tokens", "blocks", "chunks")} | {"ranks": RANKS}
    # one block, forward and backward: 2 linears of 4 h^2 multiply-adds per token, times 3
    flops = 3 * 2 * 2 * 4 * settings["hidden"] ** 2 * settings["tokens"] * settings["chunks"] * settings["blocks"]
    if gpu and torch.cuda.device_count() < RANKS:
        ctx.log(f"the pipeline comparison needs {RANKS} GPUs (one NCCL rank each); this machine has {torch.cuda.device_count()}")
        measured = {}
    else:
        per_rank = spawn(_run_rank, RANKS, settings, backend="nccl" if gpu else "gloo", timeout=1200)
        measured = {name: [rank[name] for rank in per_rank] for name in per_rank[0]}
    if measured and "torch ScheduleDualPipeV" not in measured:
        ctx.log("torch.distributed.pipelining has no ScheduleDualPipeV in this torch: compared with Schedule1F1B only")
    steps = {name: [max(times) for times in zip(*(r["times"] for r in ranks))] for name, ranks in measured.items()}
    baseline = statistics.median(steps["torch Schedule1F1B"]) if "torch Schedule1F1B" in steps else None
    for name, ranks in measured.items():
        step = statistics.median(steps[name])
        bubbles = [1 - r["alone"] / step for r in ranks]
        sim_name, sim_ranks = SIMULATED[name]
        timeline = simulator.simulate(schedule.build(sim_name, sim_ranks, settings["chunks"]))
        extra = {
            "bubble": statistics.mean(bubbles),
            "worst bubble": max(bubbles),
            "sim bubble": max(timeline.bubble) / timeline.makespan,
        }
        if "recorded busy" in ranks[0]:
            extra["recorded bubble"] = 1 - statistics.mean(r["recorded busy"] for r in ranks)
        ctx.record(
            name,
            time_s=step,
            min_time_s=min(steps[name]),
            baseline="torch 1F1B" if baseline is not None else None,
            baseline_time_s=baseline,
            flops=flops,
            params=params,
            extra=extra,
        )
    for pp in (8, 16):
        num_chunks = 2 * pp + 4
        rows = simulator.compare(pp, num_chunks)
        ctx.log(simulator.format_comparison(rows, pp, num_chunks, simulator.Costs()))
        for row in rows:
            ctx.record(
                f"simulated {row.name} PP={pp}",
                time_s=0.0,
                params={"pp": pp, "chunks": num_chunks, "ranks": row.num_ranks},
                extra={
                    "bubble units": row.bubble,
                    "README units": row.formula_bubble,
                    "activations": row.activations,
                    "parameters": row.parameters,
                },
            )
