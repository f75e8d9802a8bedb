"""Pipeline schedules as data: for each rank, the list of operations it runs.

A schedule places the stages of one pipeline (1F1B, ZB1P, DualPipeV) or of two
pipelines running in opposite directions (DualPipe) on ranks. Each rank holds
one or two stages, its *modules* 0 and 1, and runs its list of operations in
order:

===========  ================================================================
``F``        forward of micro-batch ``chunk`` through ``module``
``B``        backward of it; with ``zero_bubble`` only the input-gradient part
             runs now and the weight-gradient part is queued for a later ``W``
``W``        the oldest queued weight-gradient part (first in, first out);
             ``module``/``chunk`` name the ``B`` it belongs to
``FB``       the forward of (``module``, ``chunk``) overlapped with the
             backward of ``backward`` = (module, chunk)
``SEND_F``   queue the send of an ``F``'s outputs to the next stage's rank
``RECV_F``   queue the receive of a forward input from the previous stage's rank
``SEND_B``   queue the send of a ``B``'s input gradients to the previous stage
``RECV_B``   queue the receive of output gradients from the next stage
===========  ================================================================

Micro-batches are numbered per direction (``chunk`` in ``[0, chunks_per_direction)``).
Queued sends and receives are posted together, in one ``batch_isend_irecv``,
right before the next compute operation (or at the end of the list), which
waits for them: upstream DualPipe's rule. Between two stages on one rank (the
turn of DualPipeV's V on its last rank) data passes without communication.

:mod:`dsinfra.dualpipe.simulator` runs these lists under a cost model;
``DualPipe.step()`` and ``DualPipeV.step()`` execute the very same lists.
"""

from __future__ import annotations

import dataclasses
from collections import deque
from collections.abc import Callable

from dsinfra.validation import check_positive

F, B, W, FB = "F", "B", "W", "FB"
SEND_F, RECV_F, SEND_B, RECV_B = "SEND_F", "RECV_F", "SEND_B", "RECV_B"
COMPUTE = (F, B, W, FB)
COMMUNICATION = (SEND_F, RECV_F, SEND_B, RECV_B)

Slot = tuple[int, int]  # (rank, module)


@dataclasses.dataclass(frozen=True)
class Op:
    """One operation of a rank's list (see the module docstring for the kinds)."""

    kind: str
    module: int
    chunk: int
    zero_bubble: bool = False  # B only
    backward: tuple[int, int] | None = None  # FB only: (module, chunk) of the overlapped backward

    def __str__(self) -> str:
        text = f"{self.kind}{self.module}.{self.chunk}"
        if self.backward is not None:
            text += f"+B{self.backward[0]}.{self.backward[1]}"
        return text + ("z" if self.zero_bubble else "")


@dataclasses.dataclass(frozen=True)
class Layout:
    """Where the stages are: ``stages[rank][module] = (direction, index)``, the
    stage ``index`` (counted from the start of its pipeline) of pipeline
    ``direction`` that the rank's module is."""

    stages: tuple[tuple[tuple[int, int], ...], ...]

    @property
    def num_ranks(self) -> int:
        return len(self.stages)

    @property
    def num_directions(self) -> int:
        return 1 + max(direction for modules in self.stages for direction, _ in modules)

    @property
    def stages_per_direction(self) -> int:
        return sum(len(modules) for modules in self.stages) // self.num_directions

    def slot(self, direction: int, index: int) -> Slot:
        """The (rank, module) that holds stage ``index`` of pipeline ``direction``."""
        for rank, modules in enumerate(self.stages):
            for module, stage in enumerate(modules):
                if stage == (direction, index):
                    return rank, module
        raise ValueError(f"no stage {index} in direction {direction}")

    def neighbour(self, rank: int, module: int, step: int) -> Slot | None:
        """The slot of the stage ``step`` (+1: next, -1: previous) along the
        module's pipeline, or None past either end."""
        direction, index = self.stages[rank][module]
        index += step
        if not 0 <= index < self.stages_per_direction:
            return None
        return self.slot(direction, index)

    def is_first_stage(self, rank: int, module: int) -> bool:
        return self.neighbour(rank, module, -1) is None

    def is_last_stage(self, rank: int, module: int) -> bool:
        return self.neighbour(rank, module, +1) is None


@dataclasses.dataclass(frozen=True)
class Schedule:
    """A named schedule: where the stages are, and each rank's operations in order."""

    name: str
    num_chunks: int  # micro-batches in the step, over all directions
    layout: Layout
    ops: tuple[tuple[Op, ...], ...]  # ops[rank]
    forward_only: bool = False

    @property
    def num_ranks(self) -> int:
        return self.layout.num_ranks

    def without_backward(self) -> Schedule:
        """The schedule a forward-only step (inference) runs: the same lists with
        the backward parts left out (an ``FB`` becomes its ``F``)."""
        ops = tuple(
            tuple(Op(F, op.module, op.chunk) if op.kind == FB else op for op in rank if op.kind not in (B, W, SEND_B, RECV_B))
            for rank in self.ops
        )
        return dataclasses.replace(self, ops=ops, forward_only=True)

    @property
    def chunks_per_direction(self) -> int:
        return self.num_chunks // self.layout.num_directions


class _RankOps:
    """Builds one rank's list, numbering each module's micro-batches in the
    order they pass (as upstream's per-phase counters do)."""

    def __init__(self, layout: Layout, rank: int):
        self.layout = layout
        self.rank = rank
        self.ops: list[Op] = []
        self.counters = {kind: [0, 0] for kind in (F, B, SEND_F, RECV_F, SEND_B, RECV_B)}
        self.weights: deque[tuple[int, int]] = deque()

    def _take(self, kind: str, module: int) -> int:
        chunk = self.counters[kind][module]
        self.counters[kind][module] += 1
        return chunk

    def _remote(self, module: int, step: int) -> bool:
        neighbour = self.layout.neighbour(self.rank, module, step)
        return neighbour is not None and neighbour[0] != self.rank

    def _communicate(self, kind: str, module: int, step: int) -> None:
        if self._remote(module, step):
            self.ops.append(Op(kind, module, self._take(kind, module)))

    def recv_forward(self, module: int) -> None:
        self._communicate(RECV_F, module, -1)

    def send_forward(self, module: int) -> None:
        self._communicate(SEND_F, module, +1)

    def recv_backward(self, module: int) -> None:
        self._communicate(RECV_B, module, +1)

    def send_backward(self, module: int) -> None:
        self._communicate(SEND_B, module, -1)

    def forward(self, module: int, recv: bool = True, send: bool = True) -> None:
        if recv:
            self.recv_forward(module)
        self.ops.append(Op(F, module, self._take(F, module)))
        if send:
            self.send_forward(module)

    def backward(self, module: int, zero_bubble: bool = False, recv: bool = True, send: bool = True) -> None:
        if recv:
            self.recv_backward(module)
        chunk = self._take(B, module)
        self.ops.append(Op(B, module, chunk, zero_bubble=zero_bubble))
        if zero_bubble:
            self.weights.append((module, chunk))
        if send:
            self.send_backward(module)

    def weight(self) -> None:
        self.ops.append(Op(W, *self.weights.popleft()))

    def forward_backward(self, forward_module: int, backward_module: int, recv_forward: bool = True) -> None:
        if recv_forward:
            self.recv_forward(forward_module)
        self.recv_backward(backward_module)
        backward = (backward_module, self._take(B, backward_module))
        self.ops.append(Op(FB, forward_module, self._take(F, forward_module), backward=backward))
        self.send_forward(forward_module)
        self.send_backward(backward_module)


def _build(name: str, num_chunks: int, stages: list[list[tuple[int, int]]], rank_ops: Callable[[_RankOps], None]) -> Schedule:
    layout = Layout(tuple(tuple(modules) for modules in stages))
    ops = []
    for rank in range(layout.num_ranks):
        builder = _RankOps(layout, rank)
        rank_ops(builder)
        if builder.weights:
            raise AssertionError(f"{name}: rank {rank} leaves weight gradients queued")
        ops.append(tuple(builder.ops))
    return Schedule(name, num_chunks, layout, tuple(ops))


def _check_counts(num_ranks: int, num_chunks: int) -> None:
    check_positive("num_ranks", num_ranks)
    check_positive("num_chunks", num_chunks)


def one_f_one_b(num_ranks: int, num_chunks: int) -> Schedule:
    """1F1B: ``num_ranks`` stages, one per rank; stage s runs ``num_ranks - 1 - s``
    forwards, then alternates one forward and one backward, then drains."""
    _check_counts(num_ranks, num_chunks)

    def rank_ops(ops: _RankOps) -> None:
        warmup = min(num_ranks - 1 - ops.rank, num_chunks)
        for _ in range(warmup):
            ops.forward(0)
        for _ in range(num_chunks - warmup):
            ops.forward(0)
            ops.backward(0)
        for _ in range(warmup):
            ops.backward(0)

    return _build("1f1b", num_chunks, [[(0, rank)] for rank in range(num_ranks)], rank_ops)


def zb1p(num_ranks: int, num_chunks: int) -> Schedule:
    """ZB1P (ZB-H1 of "Zero Bubble Pipeline Parallelism"): 1F1B's order of
    forwards and backwards, with every backward split into its input-gradient
    part, on the critical path, and its weight-gradient part ``W``. Stage s
    holds back up to ``s`` ``W`` s, running them where 1F1B would wait: in the
    steady state after each backward, and at the end."""
    _check_counts(num_ranks, num_chunks)

    def rank_ops(ops: _RankOps) -> None:
        warmup = min(num_ranks - 1 - ops.rank, num_chunks)
        held = ops.rank

        def backward() -> None:
            ops.backward(0, zero_bubble=True)
            if len(ops.weights) > held:
                ops.weight()

        for _ in range(warmup):
            ops.forward(0)
        for _ in range(num_chunks - warmup):
            ops.forward(0)
            backward()
        for _ in range(warmup):
            backward()
        while ops.weights:
            ops.weight()

    return _build("zb1p", num_chunks, [[(0, rank)] for rank in range(num_ranks)], rank_ops)


def _bidirectional(
    ops: _RankOps, modules: tuple[int, int], num_half_ranks: int, half_rank: int, half_num_chunks: int, is_middle: bool
) -> None:
    """DualPipe's eight steps for one rank, in upstream's terms: phase 0 is the
    pipeline that starts on this rank's side (module ``modules[0]``), phase 1
    the one coming back (``modules[1]``). DualPipeV runs the same steps as the
    first half of a DualPipe twice as long: its "cut in half"."""
    forward, backward, weight = ops.forward, ops.backward, ops.weight
    phase0, phase1 = modules

    # Step 1: nF0 -- fill the pipeline that starts here.
    for _ in range((num_half_ranks - half_rank - 1) * 2):
        forward(phase0)

    # Step 2: nF0F1 -- the other pipeline arrives; forwards of both.
    step_2 = half_rank + 1
    ops.recv_forward(phase0)
    for i in range(step_2):
        forward(phase0, recv=False, send=is_middle)
        ops.recv_forward(phase0)
        forward(phase1, send=not is_middle or i < step_2 - 1)
        if not is_middle:
            ops.send_forward(phase0)

    # Step 3: nB1W1F1 -- first backwards, their weight parts right after.
    for _ in range(num_half_ranks - half_rank - 1):
        backward(phase1, zero_bubble=True)
        ops.recv_forward(phase1)
        weight()
        forward(phase1, recv=False)

    # Step 4 (main): nF0B1F1B0 -- a forward of one pipeline overlapped with a
    # backward of the other, twice per round.
    for i in range(half_num_chunks - 2 * num_half_ranks + half_rank + 1):
        if i == 0 and is_middle:
            # Not overlapped here: upstream's choice, which shortens the bubble.
            forward(phase0, recv=False, send=False)
            ops.send_forward(phase1)
            backward(phase1, send=False)
            ops.send_forward(phase0)
            ops.send_backward(phase1)
        else:
            ops.forward_backward(phase0, phase1, recv_forward=i > 0)
        ops.forward_backward(phase1, phase0)

    # Step 5: nB1F1B0 -- the pipeline from this side runs out of forwards.
    for _ in range(num_half_ranks - half_rank - 1):
        backward(phase1)
        ops.forward_backward(phase1, phase0)

    # Step 6: nB1B0 -- backwards of both; the later half defer their weights.
    step_6 = half_rank + 1
    zero_bubble = False
    for i in range(step_6):
        if i == step_6 // 2 and half_rank % 2 == 1:
            zero_bubble = True
        backward(phase1, zero_bubble=zero_bubble)
        if i == step_6 // 2 and half_rank % 2 == 0:
            zero_bubble = True
        backward(phase0, zero_bubble=zero_bubble)

    # Step 7: nWB0 -- deferred weights fill the wait for the last backwards.
    for _ in range(num_half_ranks - half_rank - 1):
        weight()
        backward(phase0, zero_bubble=True)

    # Step 8: nW -- the remaining weights.
    for _ in range(half_rank + 1):
        weight()


def dualpipe(num_ranks: int, num_chunks: int) -> Schedule:
    """DualPipe: two pipelines of ``num_ranks`` stages in opposite directions.
    Rank r holds stage r of direction 0 (module 0) and stage ``num_ranks - 1 - r``
    of direction 1 (module 1); each direction gets ``num_chunks / 2`` micro-batches.

    num_ranks: even; num_chunks: even and at least ``2 * num_ranks``.
    """
    _check_counts(num_ranks, num_chunks)
    if num_ranks % 2:
        raise ValueError(f"DualPipe needs an even number of ranks; got {num_ranks}")
    if num_chunks % 2 or num_chunks < 2 * num_ranks:
        raise ValueError(
            f"DualPipe needs num_chunks even and >= 2 * num_ranks ({2 * num_ranks}); got num_chunks={num_chunks}"
        )
    half = num_ranks // 2

    def rank_ops(ops: _RankOps) -> None:
        second_half = ops.rank >= half
        half_rank = min(ops.rank, num_ranks - 1 - ops.rank)
        modules = (1, 0) if second_half else (0, 1)
        _bidirectional(ops, modules, half, half_rank, num_chunks // 2, is_middle=half_rank == half - 1)

    stages = [[(0, rank), (1, num_ranks - 1 - rank)] for rank in range(num_ranks)]
    return _build("dualpipe", num_chunks, stages, rank_ops)


def dualpipev(num_ranks: int, num_chunks: int) -> Schedule:
    """DualPipeV: one pipeline of ``2 * num_ranks`` stages folded into a V. Rank
    r holds stage r (module 0) and stage ``2 * num_ranks - 1 - r`` (module 1), so
    rank 0 holds the first and the last stage.

    num_chunks: at least ``2 * num_ranks``.
    """
    _check_counts(num_ranks, num_chunks)
    if num_chunks < 2 * num_ranks:
        raise ValueError(f"DualPipeV needs num_chunks >= 2 * num_ranks ({2 * num_ranks}); got num_chunks={num_chunks}")

    def rank_ops(ops: _RankOps) -> None:
        _bidirectional(ops, (0, 1), num_ranks, ops.rank, num_chunks, is_middle=ops.rank == num_ranks - 1)

    stages = [[(0, rank), (0, 2 * num_ranks - 1 - rank)] for rank in range(num_ranks)]
    return _build("dualpipev", num_chunks, stages, rank_ops)


SCHEDULES: dict[str, Callable[[int, int], Schedule]] = {
    "1f1b": one_f_one_b,
    "zb1p": zb1p,
    "dualpipe": dualpipe,
    "dualpipev": dualpipev,
}


def build(name: str, num_ranks: int, num_chunks: int) -> Schedule:
    """The schedule ``name`` (one of :data:`SCHEDULES`) for ``num_ranks`` ranks and
    ``num_chunks`` micro-batches."""
    if name not in SCHEDULES:
        raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)}; got {name!r}")
    return SCHEDULES[name](num_ranks, num_chunks)
