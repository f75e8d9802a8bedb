"""Run a :class:`~dsinfra.dualpipe.schedule.Schedule` under a cost model.

Every rank walks its list as ``step()`` does: sends and receives are queued;
before each compute operation (and at the end) the queued ones are posted as
one batch and the rank waits for all of them. A transfer completes ``p2p``
after both its send and its receive are posted (a rendezvous, as NCCL's
grouped point-to-point behaves), and sends and receives between two ranks
pair up in the order they are posted, as on a real transport. The simulator
also checks that the schedule is sound: every operation's inputs exist when it
runs, every received message is the one the receiver expects, nothing
deadlocks, and no rank ends with work left.
"""

from __future__ import annotations

import dataclasses
from collections import deque

from dsinfra.dualpipe.schedule import B, F, FB, RECV_B, RECV_F, SEND_B, SEND_F, W, Op, Schedule, build


class ScheduleError(ValueError):
    """A schedule that cannot run: missing inputs, crossed messages, a deadlock."""


@dataclasses.dataclass(frozen=True)
class Costs:
    """Execution times, in any unit.

    forward: F, the forward of one micro-batch through one stage.
    backward: B, a full backward (input and weight gradients) through one stage.
    weight: W, the weight-gradient part of B (a zero-bubble B costs B - W).
    overlapped: F&B, a forward and a backward overlapped; None: F + B.
    p2p: latency of a point-to-point transfer.
    """

    forward: float = 1.0
    backward: float = 2.0
    weight: float = 1.0
    overlapped: float | None = None
    p2p: float = 0.0

    def __post_init__(self):
        for name in ("forward", "backward", "weight", "p2p"):
            if getattr(self, name) < 0:
                raise ValueError(f"Costs.{name} must be >= 0; got {getattr(self, name):g}")
        if self.weight > self.backward:
            raise ValueError(f"Costs.weight ({self.weight:g}) must be <= Costs.backward ({self.backward:g})")
        if self.overlapped is not None and self.overlapped < 0:
            raise ValueError(f"Costs.overlapped must be >= 0; got {self.overlapped:g}")

    @property
    def forward_backward(self) -> float:
        return self.forward + self.backward if self.overlapped is None else self.overlapped

    def of(self, op: Op) -> float:
        """Execution time of a compute operation."""
        if op.kind == F:
            return self.forward
        if op.kind == B:
            return self.backward - self.weight if op.zero_bubble else self.backward
        if op.kind == W:
            return self.weight
        return self.forward_backward


@dataclasses.dataclass(frozen=True)
class Interval:
    """A compute operation as it ran on its rank."""

    op: Op
    start: float
    end: float


@dataclasses.dataclass(frozen=True)
class Timeline:
    """What a simulated step did.

    intervals[rank]: the rank's compute operations with start and end times.
    bubble[rank]: time the rank computes nothing between the step's start and end.
    activations[rank]: peak number of micro-batches whose forward ran on one of
        the rank's stages and whose backward (weight part included) has not
        finished, in units of one stage's activations for one micro-batch.
    parameters[rank]: stages the rank holds, in units of one stage's parameters.
    """

    schedule: Schedule
    costs: Costs
    intervals: tuple[tuple[Interval, ...], ...]
    makespan: float
    bubble: tuple[float, ...]
    activations: tuple[int, ...]
    parameters: tuple[int, ...]


class _Rank:
    """One rank's progress through its list."""

    def __init__(self, ops: tuple[Op, ...]):
        self.ops = ops
        self.pc = 0
        self.clock = 0.0
        self.queued: list[tuple] = []  # (send/recv, channel, index, message) of queued transfers
        self.waiting: list[tuple[str, tuple, int]] | None = None  # a posted batch not yet complete
        self.intervals: list[Interval] = []
        self.done: set[tuple[str, int, int]] = set()  # (F/B/W/recvF/recvB, module, chunk)
        self.weights: deque[tuple[int, int]] = deque()
        self.live = 0
        self.peak = 0

    @property
    def finished(self) -> bool:
        return self.pc == len(self.ops) and self.waiting is None and not self.queued


def simulate(schedule: Schedule, costs: Costs | None = None, *, rendezvous: bool = False) -> Timeline:
    """Run every rank's list of ``schedule`` under ``costs`` (default
    :class:`Costs`) and return the timeline.

    rendezvous: False: a send completes when posted (the transport buffers
        it), so a batch waits only for its receives, each done ``p2p`` after
        its send was posted. True: a send also waits until its receive is
        posted, as NCCL's grouped sends do; a schedule that completes so cannot
        deadlock on any transport.

    Raises :class:`ScheduleError` if the schedule cannot run.
    """
    costs = costs or Costs()
    layout = schedule.layout
    ranks = [_Rank(ops) for ops in schedule.ops]
    # channel (src, dst) -> posted sends / receives in order: (post time, message)
    posted: dict[tuple[int, int], dict[str, list[tuple[float, tuple]]]] = {}
    reserved: dict[tuple, int] = {}  # (channel, side) -> transfers queued so far

    def fail(rank: int, message: str) -> None:
        raise ScheduleError(f"{schedule.name}: rank {rank}, op {ranks[rank].pc} ({ranks[rank].ops[ranks[rank].pc - 1]}): {message}")

    def queue_transfer(rank: int, op: Op) -> None:
        state = ranks[rank]
        forward = op.kind in (SEND_F, RECV_F)
        step = +1 if op.kind in (SEND_F, RECV_B) else -1
        peer, peer_module = layout.neighbour(rank, op.module, step)
        if op.kind in (SEND_F, SEND_B):
            if (B if op.kind == SEND_B else F, op.module, op.chunk) not in state.done:
                fail(rank, "sends a result not computed yet")
            # the message names what the receiver gets: (F or B, receiving module, chunk)
            message = ("F" if forward else "B", peer_module, op.chunk)
            channel, side = (rank, peer), "send"
        else:
            message = ("F" if forward else "B", op.module, op.chunk)
            channel, side = (peer, rank), "recv"
        posted.setdefault(channel, {"send": [], "recv": []})
        index = reserved.get((channel, side), 0)
        reserved[(channel, side)] = index + 1
        state.queued.append((side, channel, index, message))

    def post(rank: int) -> None:
        state = ranks[rank]
        for side, channel, index, message in state.queued:
            lists = posted[channel][side]
            if len(lists) != index:
                raise AssertionError("transfers posted out of order")
            lists.append((state.clock, message))
        state.waiting = [(side, channel, index) for side, channel, index, _ in state.queued]
        state.queued = []

    def try_complete(rank: int) -> bool:
        """Finish the rank's posted batch if every partner has posted; False if not yet."""
        state = ranks[rank]
        end = state.clock
        arrived = []
        for side, channel, index in state.waiting:
            if side == "send" and not rendezvous:
                continue
            other = posted[channel]["recv" if side == "send" else "send"]
            if len(other) <= index:
                return False
            mine_time, mine = posted[channel][side][index]
            theirs_time, theirs = other[index]
            if mine != theirs:
                src, dst = channel
                sent, received = (mine, theirs) if side == "send" else (theirs, mine)
                raise ScheduleError(
                    f"{schedule.name}: message {index} from rank {src} to rank {dst} crosses: "
                    f"sent {sent[0]}{sent[1]}.{sent[2]} (kind, module, chunk), expected {received[0]}{received[1]}.{received[2]}"
                )
            end = max(end, max(mine_time, theirs_time) + costs.p2p)
            if side == "recv":
                arrived.append(("recv" + mine[0], mine[1], mine[2]))
        state.clock = end
        state.done.update(arrived)
        state.waiting = None
        return True

    def has_input(rank: int, module: int, chunk: int, forward: bool) -> bool:
        """Whether the input of a forward (or the output gradient of a backward) is there."""
        neighbour = layout.neighbour(rank, module, -1 if forward else +1)
        if neighbour is None:
            return forward or (F, module, chunk) in ranks[rank].done  # data, or the loss
        peer, peer_module = neighbour
        if peer == rank:
            return (F if forward else B, peer_module, chunk) in ranks[rank].done
        return ("recvF" if forward else "recvB", module, chunk) in ranks[rank].done

    def run_forward(rank: int, module: int, chunk: int) -> None:
        state = ranks[rank]
        if not has_input(rank, module, chunk, forward=True):
            fail(rank, f"forward of {module}.{chunk} before its input arrived")
        state.done.add((F, module, chunk))
        state.live += 1
        state.peak = max(state.peak, state.live)

    def run_backward(rank: int, module: int, chunk: int, zero_bubble: bool) -> None:
        state = ranks[rank]
        if (F, module, chunk) not in state.done or not has_input(rank, module, chunk, forward=False):
            fail(rank, f"backward of {module}.{chunk} before its forward or its output gradient")
        state.done.add((B, module, chunk))
        if zero_bubble:
            state.weights.append((module, chunk))
        else:
            state.live -= 1

    def run_compute(rank: int, op: Op) -> None:
        state = ranks[rank]
        start = state.clock
        if op.kind == F:
            run_forward(rank, op.module, op.chunk)
        elif op.kind == B:
            run_backward(rank, op.module, op.chunk, op.zero_bubble)
        elif op.kind == FB:
            run_forward(rank, op.module, op.chunk)
            run_backward(rank, *op.backward, zero_bubble=False)
        else:  # W
            if not state.weights or state.weights[0] != (op.module, op.chunk):
                fail(rank, f"weight part of {op.module}.{op.chunk} is not the oldest one queued ({list(state.weights)})")
            state.weights.popleft()
            state.live -= 1
        state.clock = start + costs.of(op)
        state.intervals.append(Interval(op, start, state.clock))

    def advance(rank: int) -> bool:
        """Run the rank as far as it goes without waiting on a peer; whether it moved."""
        state = ranks[rank]
        moved = False
        while not state.finished:
            if state.waiting is not None:
                if not try_complete(rank):
                    return moved
                moved = True
                continue
            if state.pc == len(state.ops):  # the final batch
                post(rank)
                moved = True
                continue
            op = state.ops[state.pc]
            if op.kind in (SEND_F, RECV_F, SEND_B, RECV_B):
                state.pc += 1
                queue_transfer(rank, op)
            elif state.queued:
                post(rank)
            else:
                state.pc += 1
                run_compute(rank, op)
            moved = True
        return moved

    while not all(state.finished for state in ranks):
        if not any([advance(rank) for rank in range(len(ranks))]):
            stuck = ", ".join(
                f"rank {r} before op {s.pc} ({s.ops[s.pc - 1] if s.pc else 'start'})"
                for r, s in enumerate(ranks)
                if not s.finished
            )
            raise ScheduleError(f"{schedule.name} deadlocks: {stuck} wait for peers that never send")
    for (src, dst), sides in posted.items():
        if len(sides["send"]) != len(sides["recv"]):
            raise ScheduleError(
                f"{schedule.name}: rank {src} sends {len(sides['send'])} messages to rank {dst}, "
                f"which receives {len(sides['recv'])}"
            )
    for rank, state in enumerate(ranks):
        if (state.live or state.weights) and not schedule.forward_only:
            raise ScheduleError(f"{schedule.name}: rank {rank} ends with {state.live} micro-batches' backward unfinished")
    makespan = max(state.clock for state in ranks)
    return Timeline(
        schedule=schedule,
        costs=costs,
        intervals=tuple(tuple(state.intervals) for state in ranks),
        makespan=makespan,
        bubble=tuple(makespan - sum(i.end - i.start for i in state.intervals) for state in ranks),
        activations=tuple(state.peak for state in ranks),
        parameters=tuple(len(modules) for modules in layout.stages),
    )


# DualPipe's README table, "based on the same number of PP stages":
# schedule -> (bubble, parameters per device, activations per device, devices)
README_TABLE = {
    "1f1b": ("(PP-1)(F+B)", "1x", "PP", "PP"),
    "zb1p": ("(PP-1)(F+B-2W)", "1x", "PP", "PP"),
    "dualpipe": ("(PP/2-1)(F&B+B-3W)", "2x", "PP+1", "PP"),
    "dualpipev": ("(PP/2-1)(F&B+B-3W)", "2x", "PP+1", "PP/2"),
}


def num_stages(name: str, num_ranks: int) -> int:
    """PP, the pipeline stages of schedule ``name`` on ``num_ranks`` ranks (one
    direction's for DualPipe): DualPipeV holds two per rank."""
    return 2 * num_ranks if name == "dualpipev" else num_ranks


def bubble_formula(name: str, pp: int, costs: Costs) -> float:
    """The README's bubble of schedule ``name`` with ``pp`` stages, under ``costs``."""
    f, b, w, fb = costs.forward, costs.backward, costs.weight, costs.forward_backward
    if name == "1f1b":
        return (pp - 1) * (f + b)
    if name == "zb1p":
        return (pp - 1) * (f + b - 2 * w)
    return (pp // 2 - 1) * (fb + b - 3 * w)


@dataclasses.dataclass(frozen=True)
class Comparison:
    """One schedule's row of :func:`compare`: simulated figures (the worst rank's)
    beside the README's formulas."""

    name: str
    num_ranks: int
    bubble: float
    formula_bubble: float
    parameters: int
    activations: int
    makespan: float


def compare(pp: int, num_chunks: int, costs: Costs | None = None, *, rendezvous: bool = False) -> list[Comparison]:
    """Simulate the four schedules on ``pp`` stages (DualPipeV on ``pp / 2``
    ranks) and ``num_chunks`` micro-batches, as DualPipe's README compares them."""
    costs = costs or Costs()
    if pp < 2 or pp % 2:
        raise ValueError(f"pp must be even and >= 2 to compare the four schedules; got {pp}")
    rows = []
    for name in README_TABLE:
        ranks = pp // 2 if name == "dualpipev" else pp
        timeline = simulate(build(name, ranks, num_chunks), costs, rendezvous=rendezvous)
        rows.append(
            Comparison(
                name=name,
                num_ranks=ranks,
                bubble=max(timeline.bubble),
                formula_bubble=bubble_formula(name, pp, costs),
                parameters=max(timeline.parameters),
                activations=max(timeline.activations),
                makespan=timeline.makespan,
            )
        )
    return rows


def format_comparison(rows: list[Comparison], pp: int, num_chunks: int, costs: Costs) -> str:
    """The comparison as a plain-text table."""
    fb = "F+B" if costs.overlapped is None else f"{costs.overlapped:g}"
    lines = [
        f"PP = {pp} stages, {num_chunks} micro-batches; F = {costs.forward:g}, B = {costs.backward:g}, "
        f"W = {costs.weight:g}, F&B = {fb}, p2p = {costs.p2p:g}",
        f"{'schedule':<10} {'ranks':>10}  {'bubble':>7}  {'README bubble':<20} {'= value':>7}  "
        f"{'parameters':>10}  {'activations':>11}  {'makespan':>8}",
    ]
    for row in rows:
        bubble, params, activations, ranks = README_TABLE[row.name]
        lines.append(
            f"{row.name:<10} {f'{row.num_ranks} ({ranks})':>10}  {row.bubble:>7.4g}  {bubble:<20} {row.formula_bubble:>7.4g}  "
            f"{f'{row.parameters}x ({params})':>10}  {f'{row.activations} ({activations})':>11}  {row.makespan:>8.4g}"
        )
    return "\n".join(lines)
