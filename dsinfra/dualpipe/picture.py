"""Draw a simulated schedule the way DualPipe's README draws it: one row per
rank, time along the row, each compute operation a cell in its colour with the
micro-batch number in it. matplotlib is imported only here, when drawing.

A picture holds at most :data:`MAX_RANKS` rows and :data:`MAX_UNITS` time
units (the makespan over the smallest cost) along them: beyond that the
numbers no longer fit their cells and the file grows past what a viewer shows
well. A Chrome trace (:mod:`dsinfra.dualpipe.trace`) has no such limit.
"""

from __future__ import annotations

from dsinfra.dualpipe.schedule import B, F, FB, W
from dsinfra.dualpipe.simulator import Timeline

MAX_RANKS = 32
MAX_UNITS = 200
_INCHES_PER_UNIT = 0.14  # at the widest: 200 units, 29.5 inches, 4425 pixels at 150 dpi

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
    F&B is one bordered cell, its forward part orange and its backward part green.

    Raises ValueError for a timeline larger than :data:`MAX_RANKS` ranks or
    :data:`MAX_UNITS` time units (see :func:`check_size`)."""
    check_size(timeline)
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
    unit = _unit(timeline)
    units = timeline.makespan / unit
    inches_per_unit = 0.28 if units <= 100 else _INCHES_PER_UNIT
    figure, axes = plt.subplots(figsize=(max(6.0, inches_per_unit * units + 1.5), 0.42 * schedule.num_ranks + 1.3))
    font = 7 if units > 100 else 8
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
        title=_numbers_note(schedule),
        title_fontsize=9,
    )
    if title is None:
        bubble = max(timeline.bubble)
        title = (
            f"{schedule.name}: {schedule.num_ranks} ranks, {schedule.num_chunks} micro-batches; "
            f"bubble {bubble:g}, makespan {timeline.makespan:g} (F={costs.forward:g}, B={costs.backward:g}, W={costs.weight:g})"
        )
    axes.set_title(title, fontsize=10, loc="left")
    figure.tight_layout()
    figure.savefig(path, dpi=150, bbox_inches="tight")  # the canvas grows to hold the legend
    plt.close(figure)


def _numbers_note(schedule) -> str:
    """What the numbers in the cells mean, for the legend."""
    if len(schedule.layout.stages[0]) == 1:
        return "Numbers in the cells: micro-batches"
    second = "the reverse direction" if schedule.layout.num_directions == 2 else "the way back up the V"
    return f"Numbers in the cells: micro-batches; black on a rank's first stage, white outlined on its second ({second})"


def _unit(timeline: Timeline) -> float:
    """The smallest cost of a cell: the width that must still hold a number."""
    costs = timeline.costs
    return min((c for c in (costs.forward, costs.backward - costs.weight, costs.weight) if c > 0), default=1.0)


def check_size(timeline: Timeline) -> None:
    """Raise ValueError if ``timeline`` is too large to draw legibly."""
    ranks, units = timeline.schedule.num_ranks, timeline.makespan / _unit(timeline)
    if ranks > MAX_RANKS or units > MAX_UNITS:
        raise ValueError(
            f"a picture holds at most {MAX_RANKS} ranks and {MAX_UNITS} time units (makespan / smallest cost); "
            f"this schedule has {ranks} ranks and {units:g} units: draw fewer ranks or micro-batches, or write a trace"
        )
