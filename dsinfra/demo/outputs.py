"""What the demo leaves in its output folder and what it prints: the
progress line while it trains, the profiler traces, the pictures,
summary.json, and the summary (also written to summary.txt)."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import sys
import textwrap
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from dsinfra.demo.run import DemoOptions

BAR = 20  # characters of the progress bar: the line stays within 80 columns


def write_all(
    options: DemoOptions,
    *,
    losses: list[float],
    step_seconds: list[float],
    loads: torch.Tensor,
    plan,
    planned_imbalance: dict,
    served: list[dict],
    executed,
) -> dict:
    """Write the pictures, the pipeline step trace and summary.json; return the summary."""
    config = options.train
    out = options.out
    files = {
        "loss_curve": _loss_curve(losses, os.path.join(out, "loss_curve.png")),
        "pipeline_schedule": _schedule(config, os.path.join(out, "pipeline_schedule.png")),
        "pipeline_step_trace": _pipeline_trace(executed, config, os.path.join(out, "trace_pipeline_step.json")),
        "eplb_placement": _placement(loads, plan, config, os.path.join(out, "eplb_placement.png")),
        "trace_train_step": os.path.join(out, "trace_train_step.json"),
        "trace_decode_step": os.path.join(out, "trace_decode_step.json"),
    }
    # the loads are summed over the serving ranks: every one of them holds the same
    in_order = torch.tensor(served[0]["rank_loads_in_order"], dtype=torch.float64)
    balanced = torch.tensor(served[0]["rank_loads_balanced"], dtype=torch.float64)
    summary = {
        "config": {
            "ranks": config.world_size,
            "pp": config.pp,
            "ep": config.ep,
            "steps": config.steps,
            "batch_size": config.batch_size,
            "num_chunks": config.num_chunks,
            "fp8_experts": config.fp8,
            "model": dataclasses.asdict(config.args),
        },
        "training": {
            "first_loss": losses[0],
            "last_loss": sum(losses[-10:]) / len(losses[-10:]),
            "median_step_seconds": sorted(step_seconds)[len(step_seconds) // 2],
        },
        "balancing": {
            "redundant_experts": options.redundant_experts,
            "planned_max_over_mean": planned_imbalance,
            "serving_rank_loads_in_order": in_order.tolist(),
            "serving_rank_loads_balanced": balanced.tolist(),
            "serving_max_over_mean_in_order": (in_order.max(1).values / in_order.mean(1)).tolist(),
            "serving_max_over_mean_balanced": (balanced.max(1).values / balanced.mean(1)).tolist(),
        },
        "serving": served,
        "files": {name: os.path.basename(path) for name, path in files.items()},
    }
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
        f.write("\n")
    return summary


def progress(done: int, total: int, loss: float | None, step_seconds: list[float]) -> None:
    """Rewrite the progress line on stderr: the bar, the step, the loss, the time
    per step (median of the last ten) and the time left at that pace."""
    recent = sorted(step_seconds[-10:])
    per_step = recent[len(recent) // 2]
    bar = "#" * (BAR * done // total) + "." * (BAR - BAR * done // total)
    loss_text = "-" if loss is None else f"{loss:.3f}"
    line = f"  training [{bar}] {done}/{total}  loss {loss_text}  {per_step * 1e3:.0f} ms/step  {_duration(per_step * (total - done))} left"
    print("\r" + line.ljust(79), end="", file=sys.stderr, flush=True)


def _duration(seconds: float) -> str:
    """``3m05s``, ``45s``, ``1h02m``."""
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def profiled(fn, path: str):
    """``fn()``, traced by torch.profiler into the Chrome trace ``path``. The
    profiler's own start and stop lines on stderr are kept off the console."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    profiler = profile(activities=activities)
    with _stderr_discarded():
        profiler.start()
    try:
        value = fn()
    finally:
        with _stderr_discarded():
            profiler.stop()
    profiler.export_chrome_trace(path)
    return value


@contextlib.contextmanager
def _stderr_discarded():
    """Send what this process writes to file descriptor 2 (C++ code included) nowhere."""
    sys.stderr.flush()
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def summary_text(summary: dict, out: str, seconds: float) -> str:
    """The summary the demo prints at the end (and writes to summary.txt)."""
    training, balancing, steps = summary["training"], summary["balancing"], summary["config"]["steps"]
    lines = [
        f"training: loss {training['first_loss']:.3f} -> {training['last_loss']:.3f} "
        f"({steps} steps, {training['median_step_seconds'] * 1e3:.0f} ms/step)",
        "load balancing (max / mean rank load per MoE layer; 1 is perfectly even):",
    ]
    planned = balancing["planned_max_over_mean"]
    for layer, (before, after) in enumerate(zip(planned["before"], planned["after"])):
        lines.append(
            f"  layer {layer}: training loads {before:.3f} -> {after:.3f} planned; serving "
            f"{balancing['serving_max_over_mean_in_order'][layer]:.3f} -> {balancing['serving_max_over_mean_balanced'][layer]:.3f} measured"
        )
    lines.append("  the router's bias already keeps training loads even, so EPLB gains little here; serving traffic can differ")
    for served in summary["serving"]:
        lines.append(
            f"serving rank {served['rank']}: {len(served['prompts'])} requests, {served['sorted_correctly']} sorted correctly; "
            f"logits vs full attention: calc_diff {served['logits_calc_diff']:.2e}, tokens agree {100 * served['token_agreement']:.0f}%"
        )
    lines.append("  the sort is learned in part (300 steps: about two thirds sorted); what must hold: calc_diff < 1e-3, tokens agree")
    files = [*summary["files"].values(), "summary.json", "summary.txt"]
    lines += textwrap.wrap(f"outputs in {out}: " + ", ".join(files), 120, subsequent_indent="  ", break_on_hyphens=False)
    lines.append(f"done in {seconds:.0f} s")
    return "\n".join(lines) + "\n"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _loss_curve(losses: list[float], path: str) -> str:
    plt = _pyplot()
    figure, axes = plt.subplots(figsize=(6, 3.5))
    axes.plot(range(1, len(losses) + 1), losses, color="tab:blue")
    axes.set_xlabel("step")
    axes.set_ylabel("loss (mean cross-entropy)")
    axes.set_yscale("log")
    axes.set_title("training loss (sorting tokens)")
    axes.grid(True, alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def _schedule(config, path: str) -> str:
    from dsinfra.dualpipe import schedule
    from dsinfra.dualpipe.picture import draw
    from dsinfra.dualpipe.simulator import simulate

    title = f"DualPipeV, {config.pp} ranks, {config.num_chunks} micro-batches: simulated with unit costs (F = 1, B = 2, W = 1)"
    draw(simulate(schedule.dualpipev(config.pp, config.num_chunks)), path, title=title)
    return path


def _pipeline_trace(executed, config, path: str) -> str:
    """The last training step of the first pipeline as it ran: each pipeline
    rank's compute operations on one time line."""
    from dsinfra.dualpipe.simulator import Interval
    from dsinfra.dualpipe.trace import write_chrome_trace

    pipeline = [executed[p * config.ep] for p in range(config.pp)]  # the ranks of expert-parallel rank 0
    start = min(s for rank in pipeline for _, s, _ in rank)
    intervals = [[Interval(op, s - start, e - start) for op, s, e in rank] for rank in pipeline]
    write_chrome_trace(intervals, path, microseconds_per_unit=1e6, name="DualPipeV step (measured)")
    return path


def _placement(loads: torch.Tensor, plan, config, path: str) -> str:
    from dsinfra.eplb.plot import draw_placement

    draw_placement(loads, plan[0], 1, config.ep, path, layers=tuple(range(loads.shape[0])))
    return path
