"""Draw a simulated schedule the way DualPipe's README draws it: one row per
rank, time along the row, each compute operation a cell in its colour with the
micro-batch number in it. matplotlib is imported only here, when drawing."""

from __future__ import annotations

from dsinfra.dualpipe.schedule import B, F, FB, W
from dsinfra.dualpipe.simulator import Timeline

COLOURS = {
    "forward": "#f4b042",  # orange
    "backward": "#7ed35f",  # green
    "input": "#b8e6a4",  # light green: a zero-bubble backward's input-gradient part
    "weight": "#74b8f0",  # blue
}
LEGEND = (
    ("forward", "Forward"),
    ("backward", "Backward"),
    ("input", "Backward for input"),
    ("weight", "Backward for weights"),
)


def draw(timeline: Timeline, path: str, *, title: str | None = None) -> None:
    """Write a picture of ``timeline`` to ``path`` (format from its suffix:
    .png, .svg, .pdf). Cells hold the micro-batch number, black for a rank's
    module 0 and white for its module 1 (DualPipe's reverse direction, the
    way back of DualPipeV's V), as in DualPipe's README figures. An overlapped
    F&B is one bordered cell, its forward part orange and its backward part green."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.legend_handler import HandlerTuple
        from matplotlib.patheffects import withStroke
        from matplotlib.patches import Patch, Rectangle
    except ImportError as error:
        raise RuntimeError("drawing schedules needs matplotlib: pip install matplotlib") from error

    schedule, costs = timeline.schedule, timeline.costs
    unit = min(c for c in (costs.forward, costs.backward - costs.weight, costs.weight) if c > 0)
    width = max(6.0, min(60.0, 0.28 * timeline.makespan / unit + 1.5))
    figure, axes = plt.subplots(figsize=(width, 0.42 * schedule.num_ranks + 1.3))
    font = 7 if timeline.makespan / unit > 120 else 8
    outline = [withStroke(linewidth=1.6, foreground="#333333")]

    def label(x: float, y: float, rank: int, module: int, chunk: int, size: float) -> None:
        if size / unit < 0.6:
            return
        if module == 1:
            axes.text(x, y, str(chunk), ha="center", va="center", fontsize=font, color="white", path_effects=outline)
        else:
            axes.text(x, y, str(chunk), ha="center", va="center", fontsize=font, color="black")

    def cell(start: float, length: float, row: float, colour: str, border: bool = True) -> None:
        axes.add_patch(Rectangle((start, row), length, 0.9, facecolor=colour, edgecolor="black" if border else "none", linewidth=0.5))

    for rank, intervals in enumerate(timeline.intervals):
        row = schedule.num_ranks - 1 - rank
        for interval in intervals:
            op, start, length = interval.op, interval.start, interval.end - interval.start
            middle = row + 0.45
            if op.kind == FB:
                part = length * costs.forward / (costs.forward + costs.backward)
                cell(start, part, row, COLOURS["forward"], border=False)
                cell(start + part, length - part, row, COLOURS["backward"], border=False)
                axes.add_patch(Rectangle((start, row), length, 0.9, fill=False, edgecolor="black", linewidth=1.2))
                label(start + part / 2, middle, rank, op.module, op.chunk, part)
                label(start + part + (length - part) / 2, middle, rank, op.backward[0], op.backward[1], length - part)
                continue
            colour = {F: "forward", B: "input" if op.zero_bubble else "backward", W: "weight"}[op.kind]
            cell(start, length, row, COLOURS[colour])
            label(start + length / 2, middle, rank, op.module, op.chunk, length)

    axes.set_xlim(0, timeline.makespan)
    axes.set_ylim(-0.2, schedule.num_ranks)
    axes.set_yticks([schedule.num_ranks - 1 - r + 0.45 for r in range(schedule.num_ranks)])
    axes.set_yticklabels([f"Device {r}" for r in range(schedule.num_ranks)], fontweight="bold")
    axes.set_xlabel("Time →")
    axes.set_xticks([])
    for side in ("top", "right", "left", "bottom"):
        axes.spines[side].set_visible(False)
    axes.tick_params(left=False)
    handles: list = [Patch(facecolor=COLOURS[key], edgecolor="black") for key, _ in LEGEND]
    handles.append((Patch(facecolor=COLOURS["forward"], edgecolor="black"), Patch(facecolor=COLOURS["backward"], edgecolor="black")))
    axes.legend(
        handles,
        [text for _, text in LEGEND] + ["Overlapped forward & backward"],
        handler_map={tuple: HandlerTuple(ndivide=None, pad=0)},
        loc="upper center",
        bbox_to_anchor=(0.5, -0.12),
        ncol=len(handles),
        frameon=False,
        fontsize=9,
    )
    if title is None:
        bubble = max(timeline.bubble)
        title = (
            f"{schedule.name}: {schedule.num_ranks} ranks, {schedule.num_chunks} micro-batches; "
            f"bubble {bubble:g}, makespan {timeline.makespan:g} (F={costs.forward:g}, B={costs.backward:g}, W={costs.weight:g})"
        )
    axes.set_title(title, fontsize=10, loc="left")
    figure.tight_layout()
    figure.savefig(path, dpi=150)
    plt.close(figure)
