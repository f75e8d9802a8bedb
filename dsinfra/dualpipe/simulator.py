"""Run a :class:`~dsinfra.dualpipe.schedule.Schedule` under a cost model.

Every rank walks its list as ``step()`` does: sends and receives are queued;
before each compute operation (and at the end) the queued ones are posted as
one batch and the rank waits for them. Sends and receives between two ranks
pair up in the order they are posted, as on a real transport. A receive
completes ``p2p`` after its send was posted; with ``rendezvous``, a send also
waits for its receive, as NCCL's grouped point-to-point operations do.

The simulator also checks that the schedule is sound: every operation's
inputs exist when it runs, every message received is the one the receiver
expects, weight parts run in the order queued, nothing deadlocks, and no rank
ends with work left. It also gives the README table of DualPipe (bubbles,
parameters and activations per rank) for the four schedules: :func:`compare`.
"""

from __future__ import annotations

import dataclasses
import math
from collections import deque

from dsinfra.dualpipe.schedule import B, F, FB, RECV_B, RECV_F, SEND_B, SEND_F, W, Op, Schedule, build


class ScheduleError(ValueError):
    """A schedule that cannot run: missing inputs, crossed messages, a deadlock."""


# The largest schedule the simulator takes: its time grows faster than the
# number of operations (the largest allowed, DualPipeV on 64 ranks x 128
# micro-batches, took 17 s to build and simulate on a busy 2-core AMD EPYC).
MAX_RANKS = 64
MAX_RANKS_X_CHUNKS = 8192


def check_size(num_ranks: int, num_chunks: int, *, ranks_name: str = "num_ranks") -> None:
    """Raise ValueError if a schedule of this size is beyond what :func:`simulate` takes."""
    if num_ranks > MAX_RANKS:
        raise ValueError(f"{ranks_name} must be <= {MAX_RANKS}, the most the simulator takes; got {num_ranks}")
    if num_ranks * num_chunks > MAX_RANKS_X_CHUNKS:
        raise ValueError(
            f"{ranks_name} x num_chunks must be <= {MAX_RANKS_X_CHUNKS}, the most the simulator takes; "
            f"got {num_ranks} x {num_chunks} = {num_ranks * num_chunks}"
        )


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
        for name in ("forward", "backward", "weight", "overlapped", "p2p"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value >= 0):
                raise ValueError(f"Costs.{name} must be finite and >= 0; got {value:g}")
        if self.weight > self.backward:
            raise ValueError(f"Costs.weight ({self.weight:g}) must be <= Costs.backward ({self.backward:g})")

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
        self.pc = 0  # index of the next operation
        self.clock = 0.0
        self.queued: list[tuple[str, tuple[int, int], int, tuple]] = []  # (side, channel, index, message)
        self.waiting: list[tuple[str, tuple[int, int], int]] | None = None  # the posted batch, until complete
        self.intervals: list[Interval] = []
        self.have: set[tuple[str, int, int]] = set()  # (F, B, "recvF" or "recvB"; module, chunk) done
        self.weights: deque[tuple[int, int]] = deque()  # backwards whose weight part waits
        self.live = 0  # micro-batches holding activations
        self.peak = 0

    @property
    def current(self) -> str:
        return str(self.ops[self.pc - 1]) if self.pc else "start"

    @property
    def finished(self) -> bool:
        return self.pc == len(self.ops) and self.waiting is None and not self.queued


class _Simulation:
    """Every rank of a schedule, stepped until all finish (see :func:`simulate`).

    A transfer is matched by its channel (sending rank, receiving rank) and its
    index on that channel: the n-th send from one rank to another pairs with
    the n-th receive posted there, as on a real transport. A message names what
    the receiver gets, (F or B, receiving module, chunk), so a pair whose two
    sides name different messages has crossed.
    """

    def __init__(self, schedule: Schedule, costs: Costs, rendezvous: bool):
        self.schedule, self.costs, self.rendezvous = schedule, costs, rendezvous
        self.layout = schedule.layout
        self.ranks = [_Rank(ops) for ops in schedule.ops]
        # (channel, side) -> posted transfers in order, as (post time, message)
        self.posted: dict[tuple[tuple[int, int], str], list[tuple[float, tuple]]] = {}
        self.queued_count: dict[tuple[tuple[int, int], str], int] = {}

    def fail(self, rank: int, message: str) -> None:
        raise ScheduleError(f"{self.schedule.name}: rank {rank}, at {self.ranks[rank].current}: {message}")

    def run(self) -> Timeline:
        while not all(state.finished for state in self.ranks):
            if not any([self.advance(rank) for rank in range(len(self.ranks))]):
                stuck = ", ".join(f"rank {r} at {s.current}" for r, s in enumerate(self.ranks) if not s.finished)
                raise ScheduleError(f"{self.schedule.name} deadlocks: {stuck} wait for peers that never send")
        for (channel, side), transfers in self.posted.items():
            other = self.posted.get((channel, "recv" if side == "send" else "send"), [])
            if side == "send" and len(transfers) != len(other):
                raise ScheduleError(
                    f"{self.schedule.name}: rank {channel[0]} sends {len(transfers)} messages to rank {channel[1]}, "
                    f"which receives {len(other)}"
                )
        if not self.schedule.forward_only:
            for rank, state in enumerate(self.ranks):
                if state.live:
                    raise ScheduleError(f"{self.schedule.name}: rank {rank} ends with {state.live} backwards unfinished")
        makespan = max(state.clock for state in self.ranks)
        return Timeline(
            schedule=self.schedule,
            costs=self.costs,
            intervals=tuple(tuple(state.intervals) for state in self.ranks),
            makespan=makespan,
            bubble=tuple(makespan - sum(i.end - i.start for i in state.intervals) for state in self.ranks),
            activations=tuple(state.peak for state in self.ranks),
            parameters=tuple(len(modules) for modules in self.layout.stages),
        )

    def advance(self, rank: int) -> bool:
        """Run the rank as far as it goes without waiting on a peer; whether it moved."""
        state = self.ranks[rank]
        moved = False
        while not state.finished:
            if state.waiting is not None:
                if not self.complete(rank):
                    return moved
            elif state.pc == len(state.ops) or (state.queued and state.ops[state.pc].kind in (F, B, W, FB)):
                self.post(rank)  # before a compute operation, and at the end
            else:
                op = state.ops[state.pc]
                state.pc += 1
                if op.kind in (F, B, W, FB):
                    self.compute(rank, op)
                else:
                    self.queue(rank, op)
            moved = True
        return moved

    # -- communication --------------------------------------------------------

    def queue(self, rank: int, op: Op) -> None:
        state = self.ranks[rank]
        kind = "F" if op.kind in (SEND_F, RECV_F) else "B"
        peer, peer_module = self.layout.neighbour(rank, op.module, +1 if op.kind in (SEND_F, RECV_B) else -1)
        if op.kind in (SEND_F, SEND_B):
            if (kind, op.module, op.chunk) not in state.have:
                self.fail(rank, "sends a result not computed yet")
            side, channel, message = "send", (rank, peer), (kind, peer_module, op.chunk)
        else:
            side, channel, message = "recv", (peer, rank), (kind, op.module, op.chunk)
        index = self.queued_count.get((channel, side), 0)
        self.queued_count[(channel, side)] = index + 1
        state.queued.append((side, channel, index, message))

    def post(self, rank: int) -> None:
        state = self.ranks[rank]
        for side, channel, _, message in state.queued:
            self.posted.setdefault((channel, side), []).append((state.clock, message))
        state.waiting = [(side, channel, index) for side, channel, index, _ in state.queued]
        state.queued = []

    def complete(self, rank: int) -> bool:
        """Finish the rank's posted batch if every transfer it waits for can
        complete; False if a peer has not posted its side yet."""
        state = self.ranks[rank]
        end = state.clock
        arrived = []
        for side, channel, index in state.waiting:
            if side == "send" and not self.rendezvous:
                continue  # the transport buffers it
            other = self.posted.get((channel, "recv" if side == "send" else "send"), [])
            if len(other) <= index:
                return False
            mine_time, mine = self.posted[(channel, side)][index]
            theirs_time, theirs = other[index]
            if mine != theirs:
                sent, expected = (mine, theirs) if side == "send" else (theirs, mine)
                raise ScheduleError(
                    f"{self.schedule.name}: message {index} from rank {channel[0]} to rank {channel[1]} crosses: "
                    f"sent {sent[0]}{sent[1]}.{sent[2]}, expected {expected[0]}{expected[1]}.{expected[2]} (kind module.chunk)"
                )
            sent_time = theirs_time if side == "recv" else mine_time
            done = sent_time + self.costs.p2p
            if self.rendezvous:
                done = max(mine_time, theirs_time) + self.costs.p2p
            end = max(end, done)
            if side == "recv":
                arrived.append(("recv" + mine[0], mine[1], mine[2]))
        state.clock = end
        state.have.update(arrived)
        state.waiting = None
        return True

    # -- compute ---------------------------------------------------------------

    def has_input(self, rank: int, module: int, chunk: int, forward: bool) -> bool:
        """Whether a forward's input (or a backward's output gradient) is there."""
        have = self.ranks[rank].have
        neighbour = self.layout.neighbour(rank, module, -1 if forward else +1)
        if neighbour is None:
            return forward or (F, module, chunk) in have  # the batch, or the loss
        peer, peer_module = neighbour
        if peer == rank:  # the V's turn
            return (F if forward else B, peer_module, chunk) in have
        return ("recvF" if forward else "recvB", module, chunk) in have

    def forward(self, rank: int, module: int, chunk: int) -> None:
        state = self.ranks[rank]
        if not self.has_input(rank, module, chunk, forward=True):
            self.fail(rank, f"forward of {module}.{chunk} before its input arrived")
        state.have.add((F, module, chunk))
        state.live += 1
        state.peak = max(state.peak, state.live)

    def backward(self, rank: int, module: int, chunk: int, zero_bubble: bool) -> None:
        state = self.ranks[rank]
        if (F, module, chunk) not in state.have or not self.has_input(rank, module, chunk, forward=False):
            self.fail(rank, f"backward of {module}.{chunk} before its forward or its output gradient")
        state.have.add((B, module, chunk))
        if zero_bubble:
            state.weights.append((module, chunk))
        else:
            state.live -= 1

    def compute(self, rank: int, op: Op) -> None:
        state = self.ranks[rank]
        if op.kind == F:
            self.forward(rank, op.module, op.chunk)
        elif op.kind == B:
            self.backward(rank, op.module, op.chunk, op.zero_bubble)
        elif op.kind == FB:
            self.forward(rank, op.module, op.chunk)
            self.backward(rank, *op.backward, zero_bubble=False)
        else:
            if not state.weights or state.weights[0] != (op.module, op.chunk):
                self.fail(rank, f"the weight part of {op.module}.{op.chunk} is not the oldest one waiting ({list(state.weights)})")
            state.weights.popleft()
            state.live -= 1
        start, state.clock = state.clock, state.clock + self.costs.of(op)
        state.intervals.append(Interval(op, start, state.clock))


def simulate(schedule: Schedule, costs: Costs | None = None, *, rendezvous: bool = False) -> Timeline:
    """Run every rank's list of ``schedule`` under ``costs`` (default
    :class:`Costs`) and return the timeline.

    rendezvous: False: a send completes when posted (the transport buffers
        it), so a batch waits only for its receives, each done ``p2p`` after
        its send was posted. True: a transfer completes ``p2p`` after both its
        sides are posted and a batch waits for its sends too, as NCCL's grouped
        point-to-point operations do; a schedule that completes so cannot
        deadlock on any transport.

    Raises :class:`ScheduleError` if the schedule cannot run, ValueError if it
    is larger than :func:`check_size` allows.
    """
    check_size(schedule.num_ranks, schedule.num_chunks)
    return _Simulation(schedule, costs or Costs(), rendezvous).run()


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


def check_comparison(pp: int, num_chunks: int) -> None:
    """Raise ValueError if :func:`compare` cannot compare the four schedules on ``pp`` stages."""
    if pp < 2 or pp % 2:
        raise ValueError(f"pp must be even and >= 2 to compare the four schedules; got {pp}")
    check_size(pp, num_chunks, ranks_name="pp")


def compare(pp: int, num_chunks: int, costs: Costs | None = None, *, rendezvous: bool = False) -> list[Comparison]:
    """Simulate the four schedules on ``pp`` stages (DualPipeV on ``pp / 2``
    ranks) and ``num_chunks`` micro-batches, as DualPipe's README compares them."""
    costs = costs or Costs()
    check_comparison(pp, num_chunks)
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
