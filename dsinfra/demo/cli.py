"""Train a small DeepSeek-V3-style model with DualPipeV x expert parallelism
(deep_ep dispatch/combine, FP8 experts through deep_gemm), balance its experts
with EPLB, and serve it through FlashMLA and deep_ep's low-latency mode,
checked against the model's own full-attention forward.

By default 4 local processes over gloo (2 pipeline x 2 expert-parallel ranks).
Under torchrun it runs on the processes torchrun started, across machines too:

    torchrun --nnodes 2 --nproc-per-node 2 --rdzv-endpoint HOST:29500 -m dsinfra demo --pp 2 --ep 2

Outputs (in --out): summary.json, loss_curve.png, pipeline_schedule.png,
eplb_placement.png, trace_train_step.json, trace_decode_step.json (Chrome
traces from torch.profiler) and trace_pipeline_step.json (the pipeline's
operations in one measured step).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

from dsinfra.cli import CommandError

QUICK = {"steps": 12, "batch_size": 16, "requests_per_rank": 3}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ranks", type=int, default=None, help="processes (default pp x ep; torchrun: its world size)")
    parser.add_argument("--pp", type=int, default=2, help="pipeline-parallel ranks (DualPipeV; default 2)")
    parser.add_argument("--ep", type=int, default=2, help="expert-parallel ranks (default 2)")
    parser.add_argument("--steps", type=int, default=None, help="training steps (default 300; --quick 12)")
    parser.add_argument("--out", default="demo-out", help="output folder (default demo-out)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="cpu (gloo) or cuda (NCCL, one GPU per rank)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-fp8", action="store_true", help="bf16/fp32 experts instead of deep_gemm's FP8Linear")
    parser.add_argument("--quick", action="store_true", help="a few steps and requests: the whole path in under a minute")


def options_from(args: argparse.Namespace, world_size: int):
    from dsinfra.demo.run import DemoOptions
    from dsinfra.models.training import TrainConfig

    if args.pp * args.ep != world_size:
        raise CommandError(f"--pp x --ep ({args.pp} x {args.ep} = {args.pp * args.ep}) must equal the number of ranks ({world_size})")
    sizes = dict(QUICK) if args.quick else {}
    if args.steps is not None:
        if args.steps < 1:
            raise CommandError(f"--steps must be >= 1; got {args.steps}")
        sizes["steps"] = args.steps
    train_sizes = {k: sizes[k] for k in ("steps", "batch_size") if k in sizes}
    try:
        train = TrainConfig(pp=args.pp, ep=args.ep, seed=args.seed, fp8=not args.no_fp8, device=args.device, **train_sizes)
    except ValueError as error:
        raise CommandError(str(error)) from None
    serve_sizes = {k: sizes[k] for k in ("requests_per_rank",) if k in sizes}
    return DemoOptions(train=train, out=os.path.abspath(args.out), **serve_sizes)


def _prepare_out(path: str) -> None:
    try:
        os.makedirs(path, exist_ok=True)
        probe = os.path.join(path, ".dsinfra-write-test")
        with open(probe, "w"):
            pass
        os.remove(probe)
    except OSError as error:
        raise CommandError(f"--out {path}: cannot write there ({error.strerror})") from None


def run(args: argparse.Namespace) -> int:
    launched_by_torchrun = "TORCHELASTIC_RUN_ID" in os.environ
    world_size = int(os.environ["WORLD_SIZE"]) if launched_by_torchrun else (args.ranks or args.pp * args.ep)
    if args.ranks is not None and args.ranks != world_size:
        raise CommandError(f"--ranks {args.ranks} differs from torchrun's world size {world_size}")
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise CommandError("--device cuda: no CUDA device is available here")
    options = options_from(args, world_size)
    _prepare_out(options.out)
    start = time.perf_counter()
    if launched_by_torchrun:
        summary = _run_under_torchrun(options, args.device)
    else:
        from dsinfra.demo.run import run_rank
        from dsinfra.testing import spawn

        print(f"dsinfra demo: {world_size} processes ({args.pp} pipeline x {args.ep} expert-parallel), {args.device}", file=sys.stderr)
        summary = spawn(run_rank, world_size, options, backend="nccl" if args.device == "cuda" else "gloo", timeout=3600)[0]
    if summary is not None:
        _print_summary(summary, options, time.perf_counter() - start)
    return 0


def _run_under_torchrun(options, device: str):
    import torch
    import torch.distributed as dist

    from dsinfra.demo.run import run_rank

    rank = int(os.environ["RANK"])
    if device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if device == "cuda" else "gloo")
    try:
        return run_rank(rank, dist.get_world_size(), dist.group.WORLD, options)
    finally:
        dist.destroy_process_group()


def _print_summary(summary: dict, options, seconds: float) -> None:
    training, balancing = summary["training"], summary["balancing"]
    print(f"training: loss {training['first_loss']:.3f} -> {training['last_loss']:.3f} "
          f"({summary['config']['steps']} steps, {training['median_step_seconds'] * 1e3:.0f} ms/step)")
    print("load balancing (max / mean rank load per MoE layer):")
    planned = balancing["planned_max_over_mean"]
    for layer, (before, after) in enumerate(zip(planned["before"], planned["after"])):
        print(f"  layer {layer}: training loads {before:.3f} -> {after:.3f} planned; serving "
              f"{balancing['serving_max_over_mean_in_order'][layer]:.3f} -> {balancing['serving_max_over_mean_balanced'][layer]:.3f} measured")
    for served in summary["serving"]:
        print(f"serving rank {served['rank']}: {len(served['prompts'])} requests, {served['sorted_correctly']} finished the sort correctly; "
              f"logits vs full attention: calc_diff {served['logits_calc_diff']:.2e}, tokens agree {100 * served['token_agreement']:.0f}%")
    print(f"outputs in {options.out}: " + ", ".join(summary["files"].values()) + ", summary.json")
    print(f"done in {seconds:.0f} s")
