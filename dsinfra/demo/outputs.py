"""What the demo leaves in its output folder, and the summary it prints."""

from __future__ import annotations

import dataclasses
import json
import os

import torch

from dsinfra.demo.run import DemoOptions


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

    draw(simulate(schedule.dualpipev(config.pp, config.num_chunks)), path, title=f"DualPipeV, {config.pp} ranks, {config.num_chunks} micro-batches")
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

    draw_placement(loads, plan[0], 1, config.ep, path, layers=tuple(range(min(2, loads.shape[0]))))
    return path
