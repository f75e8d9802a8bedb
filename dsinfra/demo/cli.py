"""Train a small DeepSeek-V3-style model with DualPipeV x expert parallelism
(deep_ep dispatch/combine, FP8 experts through deep_gemm), balance its experts
with EPLB, and serve it through FlashMLA and deep_ep's low-latency mode,
checked against the model's own full-attention forward.

By default 4 local processes over gloo (2 pipeline x 2 expert-parallel ranks).
Under torchrun it runs on the processes torchrun started, across machines too
(the same command on each machine, HOST being the first one's address):

    torchrun --nnodes 2 --nproc-per-node 2 --rdzv-backend c10d --rdzv-endpoint HOST:29500 \\
        -m dsinfra demo --pp 2 --ep 2 --out demo-out

Outputs (in --out): summary.txt (what it prints at the end), summary.json,
loss_curve.png, pipeline_schedule.png, eplb_placement.png,
trace_train_step.json, trace_decode_step.json (Chrome traces from
torch.profiler) and trace_pipeline_step.json (the pipeline's operations in one
measured step). Ctrl-C stops every process and says what was written.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import threading
import time

from dsinfra.cli import CommandError

QUICK = {"steps": 12, "batch_size": 16, "requests_per_rank": 3}
MAX_SEED = 2**32 - 1


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ranks", type=int, default=None, help="processes (default pp x ep; torchrun: its world size)")
    parser.add_argument("--pp", type=int, default=2, help="pipeline-parallel ranks (DualPipeV; default 2)")
    parser.add_argument("--ep", type=int, default=2, help="expert-parallel ranks (default 2)")
    parser.add_argument("--steps", type=int, default=None, help="training steps (default 300; --quick 12)")
    parser.add_argument("--out", default="demo-out", help="output folder (default demo-out)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="cpu (gloo) or cuda (NCCL, one GPU per rank)")
    parser.add_argument("--seed", type=int, default=0, help=f"model initialisation and data, 0 to {MAX_SEED} (default 0)")
    parser.add_argument("--no-fp8", action="store_true", help="bf16/fp32 experts instead of deep_gemm's FP8Linear")
    parser.add_argument(
        "--quick", action="store_true", help="12 steps and 3 requests per serving rank: the whole path in 20 s to a few minutes on 2 CPU cores"
    )


def options_from(args: argparse.Namespace, world_size: int):
    from dsinfra.demo.run import DemoOptions
    from dsinfra.models.training import TrainConfig

    for flag, value in (("--pp", args.pp), ("--ep", args.ep)):
        if value < 1:
            raise CommandError(f"{flag} must be >= 1; got {value}")
    if not 0 <= args.seed <= MAX_SEED:
        raise CommandError(f"--seed must be in 0 to {MAX_SEED}; got {args.seed}")
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
    if args.ranks is not None and args.ranks < 1:
        raise CommandError(f"--ranks must be >= 1; got {args.ranks}")
    launched_by_torchrun = "TORCHELASTIC_RUN_ID" in os.environ
    world_size = int(os.environ["WORLD_SIZE"]) if launched_by_torchrun else (args.ranks or args.pp * args.ep)
    if launched_by_torchrun and args.ranks is not None and args.ranks != world_size:
        raise CommandError(f"--ranks {args.ranks} differs from torchrun's world size {world_size}")
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise CommandError("--device cuda: no CUDA device is available here")
    options = options_from(args, world_size)
    _prepare_out(options.out)
    start, started_at = time.perf_counter(), time.time()
    try:
        if launched_by_torchrun:
            summary = _run_under_torchrun(options, args.device)
        else:
            from dsinfra.demo.run import run_rank
            from dsinfra.testing import spawn

            print(f"dsinfra demo: {world_size} processes ({args.pp} pipeline x {args.ep} expert-parallel), {args.device}", file=sys.stderr)
            with _ranks_deaf_to_ctrl_c():
                summary = spawn(run_rank, world_size, options, backend="nccl" if args.device == "cuda" else "gloo", timeout=3600)[0]
    except KeyboardInterrupt:
        raise KeyboardInterrupt(_written_since(options.out, started_at)) from None
    if summary is not None:
        from dsinfra.demo.outputs import summary_text

        text = summary_text(summary, args.out, time.perf_counter() - start)
        print(text, end="")
        with open(os.path.join(options.out, "summary.txt"), "w") as file:
            file.write(text)
    return 0


@contextlib.contextmanager
def _ranks_deaf_to_ctrl_c():
    """Start the ranks with SIGINT blocked, so that Ctrl-C (sent to every process
    of the terminal's group) reaches this process only: it stops the ranks
    (``spawn`` kills them on its way out) and says so in one line, instead of
    every rank printing a traceback. The signal arrives through a thread that
    keeps it unblocked; Python raises KeyboardInterrupt in the main thread."""
    if not hasattr(signal, "pthread_sigmask"):  # Windows: no signal masks
        yield
        return
    from multiprocessing import resource_tracker

    resource_tracker.ensure_running()  # started later, it would unblock SIGINT again on its way
    done = threading.Event()
    receiver = threading.Thread(target=done.wait, name="dsinfra-ctrl-c", daemon=True)
    receiver.start()
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
        done.set()
        receiver.join()


def _written_since(out: str, started_at: float) -> str:
    """What the run wrote into ``out`` before it was stopped, in words."""
    written = sorted(name for name in os.listdir(out) if os.path.getmtime(os.path.join(out, name)) >= started_at)
    return f"{', '.join(written)} written in {out} so far" if written else "no outputs written"


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
