"""A schedule's timeline as a Chrome trace (JSON), for chrome://tracing or
https://ui.perfetto.dev: one track per rank, one slice per compute operation."""

from __future__ import annotations

import json
from collections.abc import Sequence

from dsinfra.dualpipe.schedule import FB
from dsinfra.dualpipe.simulator import Interval

_NAMES = {"F": "forward", "B": "backward", "W": "weight", "FB": "forward & backward"}


def chrome_trace(intervals: Sequence[Sequence[Interval]], *, microseconds_per_unit: float, name: str = "pipeline") -> dict:
    """The trace of ``intervals[rank]`` (a simulated timeline's, or the
    ``executed`` list of each rank of a real step) as a Chrome trace object.

    microseconds_per_unit: how long one unit of the intervals' times is
        (1000 for a simulated timeline drawn as milliseconds, 1e6 for seconds).
    """
    events: list[dict] = [{"name": "process_name", "ph": "M", "pid": 0, "args": {"name": name}}]
    for rank, rank_intervals in enumerate(intervals):
        events.append({"name": "thread_name", "ph": "M", "pid": 0, "tid": rank, "args": {"name": f"rank {rank}"}})
        events.append({"name": "thread_sort_index", "ph": "M", "pid": 0, "tid": rank, "args": {"sort_index": rank}})
        for interval in rank_intervals:
            op = interval.op
            if op.kind not in _NAMES:  # communication: no duration of its own
                continue
            args = {"module": op.module, "micro-batch": op.chunk}
            if op.kind == FB:
                args.update({"backward module": op.backward[0], "backward micro-batch": op.backward[1]})
            if op.zero_bubble:
                args["weight gradient"] = "deferred"
            events.append(
                {
                    "name": str(op),
                    "cat": _NAMES[op.kind],
                    "ph": "X",
                    "pid": 0,
                    "tid": rank,
                    "ts": interval.start * microseconds_per_unit,
                    "dur": (interval.end - interval.start) * microseconds_per_unit,
                    "args": args,
                }
            )
    return {"traceEvents": events, "displayTimeUnit": "ms"}


def write_chrome_trace(intervals: Sequence[Sequence[Interval]], path: str, *, microseconds_per_unit: float, name: str = "pipeline") -> None:
    with open(path, "w") as out:
        json.dump(chrome_trace(intervals, microseconds_per_unit=microseconds_per_unit, name=name), out)
        out.write("\n")
