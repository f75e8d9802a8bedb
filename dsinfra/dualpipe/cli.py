"""Simulate a pipeline schedule (dualpipe, dualpipev, 1f1b, zb1p) and draw it.

    python -m dsinfra schedule dualpipe --ranks 8 --chunks 20 --out dualpipe.png
    python -m dsinfra schedule dualpipev --ranks 4 --chunks 10 --trace dualpipev.json
    python -m dsinfra schedule dualpipe --compare

Prints each rank's bubble and peak activations under the cost model (times of
F, B, W and F&B, p2p latency); --out draws the schedule like DualPipe's README
figure; --trace writes a Chrome trace (chrome://tracing, ui.perfetto.dev; one
time unit shows as 1 ms); --compare prints the bubble and memory table of all
four schedules on the same number of stages PP (the drawn schedule's).

The simulator takes at most 64 ranks and 8192 ranks x micro-batches; a
picture at most 32 ranks and 200 time units (makespan / smallest cost).
"""

from __future__ import annotations

import argparse

from dsinfra.cli import CommandError, check_output, in_flag_terms
from dsinfra.dualpipe import picture, schedule, simulator

FLAGS = {
    "num_ranks": "--ranks",
    "num_chunks": "--chunks",
    "Costs.forward": "--forward",
    "Costs.backward": "--backward",
    "Costs.weight": "--weight",
    "Costs.overlapped": "--overlapped",
    "Costs.p2p": "--p2p",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("schedule", choices=list(schedule.SCHEDULES), help="the schedule to simulate")
    parser.add_argument("--ranks", type=int, default=8, help="pipeline ranks (default 8)")
    parser.add_argument("--chunks", type=int, default=20, help="micro-batches per step (default 20)")
    parser.add_argument("--out", metavar="PATH", help="draw the schedule to this picture (.png, .svg, .pdf)")
    parser.add_argument("--trace", metavar="PATH", help="write the simulated timeline as a Chrome trace (JSON)")
    parser.add_argument("--compare", action="store_true", help="print the simulator's table of all four schedules")
    costs = parser.add_argument_group("cost model (any time unit)")
    costs.add_argument("--forward", type=float, default=1.0, help="F: forward of one stage (default 1)")
    costs.add_argument("--backward", type=float, default=2.0, help="B: full backward of one stage (default 2)")
    costs.add_argument("--weight", type=float, default=1.0, help="W: the weight-gradient part of B (default 1)")
    costs.add_argument("--overlapped", type=float, default=None, help="F&B: overlapped forward and backward (default F + B)")
    costs.add_argument("--p2p", type=float, default=0.0, help="latency of one transfer (default 0)")
    costs.add_argument("--rendezvous", action="store_true", help="sends wait for their receives (NCCL-like)")


def run(args: argparse.Namespace) -> int:
    costs = _check(args)
    try:
        timeline = simulator.simulate(schedule.build(args.schedule, args.ranks, args.chunks), costs, rendezvous=args.rendezvous)
    except (TypeError, ValueError) as error:
        raise in_flag_terms(error, FLAGS) from None
    if args.out:
        try:
            picture.check_size(timeline)
        except ValueError as error:
            raise CommandError(f"--out {args.out}: {error}") from None
    print(f"{args.schedule}: {args.ranks} ranks, {args.chunks} micro-batches, makespan {timeline.makespan:g}")
    print(f"{'rank':>4}  {'bubble':>7}  {'activations':>11}  {'parameters':>10}")
    for rank in range(args.ranks):
        print(f"{rank:>4}  {timeline.bubble[rank]:>7.4g}  {timeline.activations[rank]:>11}  {timeline.parameters[rank]:>9}x")
    if args.out:
        try:
            picture.draw(timeline, args.out)
        except (OSError, ValueError) as error:
            raise CommandError(f"--out {args.out}: {error}") from None
        print(f"wrote {args.out}")
    if args.trace:
        from dsinfra.dualpipe.trace import write_chrome_trace

        try:
            write_chrome_trace(timeline.intervals, args.trace, microseconds_per_unit=1000, name=args.schedule)
        except OSError as error:
            raise CommandError(f"--trace {args.trace}: {error.strerror}") from None
        print(f"wrote {args.trace}")
    if args.compare:
        pp = simulator.num_stages(args.schedule, args.ranks)
        rows = simulator.compare(pp, args.chunks, costs, rendezvous=args.rendezvous)
        print()
        print(simulator.format_comparison(rows, pp, args.chunks, costs))
    return 0


def _check(args: argparse.Namespace) -> simulator.Costs:
    """Every check that needs no simulation, before any: the sizes, the costs, the output paths."""
    for flag, value in (("--ranks", args.ranks), ("--chunks", args.chunks)):
        if value < 1:
            raise CommandError(f"{flag} must be >= 1; got {value}")
    try:
        costs = simulator.Costs(args.forward, args.backward, args.weight, args.overlapped, args.p2p)
        simulator.check_size(args.ranks, args.chunks)
    except ValueError as error:
        raise in_flag_terms(error, FLAGS) from None
    if args.compare:
        try:
            simulator.check_comparison(simulator.num_stages(args.schedule, args.ranks), args.chunks)
        except ValueError as error:
            raise CommandError(f"--compare: {in_flag_terms(error, FLAGS)}") from None
    if args.out:
        if args.ranks > picture.MAX_RANKS:
            raise CommandError(f"--out: a picture holds at most {picture.MAX_RANKS} ranks; got --ranks {args.ranks}")
        check_output("--out", args.out, picture=True)
    if args.trace:
        check_output("--trace", args.trace)
    return costs
