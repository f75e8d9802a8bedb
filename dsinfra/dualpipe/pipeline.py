"""The engine of DualPipe and DualPipeV: one rank running its list of a
:class:`~dsinfra.dualpipe.schedule.Schedule` on real modules and tensors.

``step()`` builds the schedule (the same one the simulator runs) and executes
this rank's operations in order. Sends and receives are queued and posted
together, in one ``torch.distributed.batch_isend_irecv``, right before the
next compute operation, which waits for them. Every operation executed is
recorded with its start and end times in ``Pipeline.executed``.
"""

from __future__ import annotations

import itertools
import time
from collections import deque
from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist
from torch import nn

from dsinfra.dualpipe import comm
from dsinfra.dualpipe.schedule import B, F, FB, RECV_B, RECV_F, SEND_B, SEND_F, W, Op, Schedule
from dsinfra.dualpipe.simulator import Interval
from dsinfra.dualpipe.utils import gather, run_backward, scatter
from dsinfra.dualpipe.zero_bubble import WeightGradStore
from dsinfra.validation import check_positive

Tensors = list[torch.Tensor]


def _device_of(modules: Sequence[nn.Module], group: dist.ProcessGroup) -> torch.device:
    """The one device the modules live on, checked against the group's backend."""
    devices = {t.device for module in modules for t in itertools.chain(module.parameters(), module.buffers())}
    if len(devices) > 1:
        raise ValueError(f"modules must all live on one device; found {', '.join(sorted(map(str, devices)))}")
    backend = str(dist.get_backend(group))
    wanted = {"nccl": "cuda", "gloo": "cpu"}.get(backend)
    if devices:
        device = devices.pop()
    else:
        device = torch.device("cuda", torch.cuda.current_device()) if wanted == "cuda" else torch.device("cpu")
    if wanted is not None and device.type != wanted:
        raise ValueError(f"modules must be on {wanted} for a {backend} process group; they are on {device}")
    if device.type == "cuda" and device.index != torch.cuda.current_device():
        raise ValueError(
            f"modules are on {device} but the current CUDA device is cuda:{torch.cuda.current_device()}; "
            "call torch.cuda.set_device first"
        )
    return device


def _module_pair(modules) -> tuple[nn.Module, nn.Module]:
    """This rank's two stages, from any container of exactly two modules: a
    tuple or list, or an ``nn.Sequential`` / ``nn.ModuleList`` (what DeepSeek's
    examples pass), whose children are the two stages."""
    if isinstance(modules, (nn.Sequential, nn.ModuleList)) or (
        isinstance(modules, Sequence) and not isinstance(modules, (str, bytes))
    ):
        pair = tuple(modules)
        if len(pair) == 2 and all(isinstance(m, nn.Module) for m in pair):
            return pair
    raise ValueError(
        "modules must be two nn.Modules, this rank's two stages (a tuple, a list, or an nn.Sequential "
        f"or nn.ModuleList of two); got {modules!r}"
    )


class Pipeline(nn.Module):
    """What DualPipe and DualPipeV share: this rank's two modules, the process
    group and the order of its ranks, and ``step()``. A subclass gives the
    function that builds its schedule."""

    build_schedule: Callable[[int, int], Schedule]

    def __init__(
        self,
        modules: Sequence[nn.Module] | nn.Sequential | nn.ModuleList,
        batch_dim: int = 0,
        process_group: dist.ProcessGroup | None = None,
        rank_mapping: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        name = type(self).__name__
        if not dist.is_initialized():
            raise ValueError(f"{name} needs torch.distributed initialised (torch.distributed.init_process_group) first")
        modules = _module_pair(modules)
        self.module = nn.ModuleList(modules)
        module_type = type(modules[0])
        self.overlapped_forward_backward = type(modules[1]) is module_type and hasattr(module_type, "overlapped_forward_backward")
        self.batch_dim = check_positive("batch_dim", batch_dim, allow_zero=True)
        self.group = process_group if process_group is not None else dist.group.WORLD
        group_rank = dist.get_rank(self.group)
        if group_rank < 0:
            raise ValueError(f"this process (global rank {dist.get_rank()}) is not in process_group")
        self.num_ranks = dist.get_world_size(self.group)
        self._check_num_ranks(self.num_ranks)
        if rank_mapping is None:
            rank_mapping = list(range(self.num_ranks))
        if sorted(rank_mapping) != list(range(self.num_ranks)):
            raise ValueError(
                f"rank_mapping must map the {self.num_ranks} ranks of the process group to pipeline ranks "
                f"0..{self.num_ranks - 1}, each once; got {list(rank_mapping)}"
            )
        self.rank = rank_mapping[group_rank]
        # global rank of each pipeline rank, for the point-to-point operations
        self.global_ranks = [dist.get_global_rank(self.group, list(rank_mapping).index(r)) for r in range(self.num_ranks)]
        self.device = _device_of(modules, self.group)
        self.executed: list[Interval] = []
        self._schedules: dict[int, Schedule] = {}

    def _check_num_ranks(self, num_ranks: int) -> None:
        """Raise ValueError if the schedule cannot run on ``num_ranks`` ranks."""

    def schedule(self, num_chunks: int) -> Schedule:
        """The schedule ``step(num_chunks=...)`` runs (every rank's list)."""
        check_positive("num_chunks", num_chunks)
        if num_chunks not in self._schedules:
            self._schedules[num_chunks] = type(self).build_schedule(self.num_ranks, num_chunks)
        return self._schedules[num_chunks]

    def step(
        self,
        *inputs: torch.Tensor | None,
        num_chunks: int = 0,
        criterion: Callable[..., torch.Tensor] | None = None,
        labels: Sequence[torch.Tensor | None] = (),
        return_outputs: bool = False,
    ) -> tuple[torch.Tensor | None, torch.Tensor | tuple[torch.Tensor, ...] | None]:
        """Run one training step (or, under ``torch.no_grad()``, one forward-only step).

        inputs: the batch, on the ranks that hold a first stage; ignored elsewhere.
            Split into micro-batches along ``batch_dim``; None entries pass as None.
        num_chunks: the number of micro-batches in the step.
        criterion: ``criterion(*outputs, *labels) -> loss`` of one micro-batch, on
            the ranks that hold a last stage; required there for training.
        labels: the labels of the batch whose last stage is on this rank, split
            like the inputs.
        return_outputs: also return the last stage's outputs.

        Returns (loss, outputs) on a rank that holds a last stage: loss, ``[chunks]``,
        one entry per micro-batch (None without a criterion), and the outputs
        concatenated along ``batch_dim`` (a tensor, or a tuple if the stage
        returns several; None unless ``return_outputs``). (None, None) elsewhere.
        Gradients accumulate into the modules' parameters, summed over micro-batches.

        Every rank must have set the same p2p shapes and dtype and pass the same
        ``num_chunks`` under the same grad mode: otherwise every rank raises the
        same ValueError, naming what each rank has.
        """
        self._check_ranks_agree(num_chunks)
        comm.check_configured()
        schedule = self.schedule(num_chunks)
        if not torch.is_grad_enabled():
            schedule = schedule.without_backward()
        return _Step(self, schedule, inputs, criterion, labels, return_outputs).run()

    def _check_ranks_agree(self, num_chunks: int) -> None:
        descriptions = comm.gather_if_different(comm.describe_step(num_chunks, torch.is_grad_enabled()), self.group, self.device)
        if descriptions is None:
            return
        by_description: dict[str, list[int]] = {}
        for group_rank, description in enumerate(descriptions):
            pipeline_rank = self.global_ranks.index(dist.get_global_rank(self.group, group_rank))
            by_description.setdefault(description, []).append(pipeline_rank)
        what = "; ".join(
            f"rank{'s' if len(ranks) > 1 else ''} {', '.join(map(str, sorted(ranks)))}: {description}"
            for description, ranks in sorted(by_description.items(), key=lambda item: min(item[1]))
        )
        raise ValueError(
            "every pipeline rank must call set_p2p_tensor_shapes and set_p2p_tensor_dtype with the same values "
            f"and step() with the same num_chunks and grad mode; they differ: {what}"
        )


class _Step:
    """The state of one step on one rank, keyed by (module, chunk)."""

    def __init__(
        self,
        pipe: Pipeline,
        schedule: Schedule,
        inputs: Sequence[torch.Tensor | None],
        criterion: Callable[..., torch.Tensor] | None,
        labels: Sequence[torch.Tensor | None] | torch.Tensor,
        return_outputs: bool,
    ):
        self.pipe = pipe
        self.schedule = schedule
        self.layout = schedule.layout
        self.rank = pipe.rank
        self.training = not schedule.forward_only
        self.criterion = criterion
        self.return_outputs = return_outputs
        chunks = schedule.chunks_per_direction
        self.inputs: dict[tuple[int, int], Tensors] = {}
        self.outputs: dict[tuple[int, int], Tensors] = {}
        self.output_grads: dict[tuple[int, int], list[torch.Tensor | None]] = {}
        self.input_grads: dict[tuple[int, int], list[torch.Tensor | None]] = {}
        self.losses: dict[int, torch.Tensor] = {}
        self.labels: list[tuple] = []
        self.pending: list[dist.P2POp] = []
        self.to_free: Tensors = []
        self.weights: deque[tuple[int, int]] = deque()

        modules = range(len(self.layout.stages[self.rank]))
        first = [m for m in modules if self.layout.is_first_stage(self.rank, m)]
        last = [m for m in modules if self.layout.is_last_stage(self.rank, m)]
        for module in first:
            if not any(isinstance(t, torch.Tensor) for t in inputs):
                raise ValueError(f"pipeline rank {self.rank} holds a first stage: step() needs the batch's inputs there")
            for chunk, micro in enumerate(scatter(inputs, chunks, pipe.batch_dim)):
                self.inputs[(module, chunk)] = list(micro)
        self.loss_module = last[0] if last else None
        if last and criterion is None and self.training:
            raise ValueError(f"pipeline rank {self.rank} holds a last stage: a training step() needs a criterion there")
        if last and criterion is not None:
            labels = (labels,) if isinstance(labels, torch.Tensor) else tuple(labels)
            self.labels = scatter(labels, chunks, pipe.batch_dim, name="labels")

    # -- running the list ---------------------------------------------------

    def run(self) -> tuple[torch.Tensor | None, torch.Tensor | tuple[torch.Tensor, ...] | None]:
        WeightGradStore.clear()
        executed = self.pipe.executed = []
        handlers = {
            F: lambda op: self.forward(op.module, op.chunk),
            B: lambda op: self.backward(op.module, op.chunk, op.zero_bubble),
            W: lambda op: self.weight(op.module, op.chunk),
            FB: self.forward_backward,
            SEND_F: lambda op: self.send_forward(op.module, op.chunk),
            RECV_F: lambda op: self.recv_forward(op.module, op.chunk),
            SEND_B: lambda op: self.send_backward(op.module, op.chunk),
            RECV_B: lambda op: self.recv_backward(op.module, op.chunk),
        }
        try:
            for op in self.schedule.ops[self.rank]:
                if op.kind in (F, B, W, FB):
                    self.commit()
                start = time.perf_counter()
                handlers[op.kind](op)
                executed.append(Interval(op, start, time.perf_counter()))
            self.commit()
            if self.weights or not WeightGradStore.funcs_queue.empty():
                raise AssertionError(f"rank {self.rank} ends the step with weight gradients still queued")
        finally:
            WeightGradStore.clear()
        return self.results()

    def results(self) -> tuple[torch.Tensor | None, torch.Tensor | tuple[torch.Tensor, ...] | None]:
        if self.loss_module is None:
            return None, None
        chunks = range(self.schedule.chunks_per_direction)
        loss = torch.stack([self.losses[c].detach() for c in chunks]) if self.criterion is not None else None
        outputs = None
        if self.return_outputs:
            outputs = gather([self.outputs[(self.loss_module, c)] for c in chunks], self.pipe.batch_dim)
            outputs = outputs[0] if len(outputs) == 1 else outputs
        return loss, outputs

    # -- compute --------------------------------------------------------------

    def forward_inputs(self, module: int, chunk: int) -> Tensors:
        return self.inputs[(module, chunk)] if self.training else self.inputs.pop((module, chunk))

    def criterion_and_labels(self, module: int, chunk: int) -> tuple[Callable | None, tuple]:
        if module == self.loss_module and self.criterion is not None:
            return self.criterion, self.labels[chunk]
        return None, ()

    def after_forward(self, module: int, chunk: int, outputs, loss: torch.Tensor | None) -> None:
        outputs = [outputs] if isinstance(outputs, torch.Tensor) else list(outputs)
        if loss is not None:
            self.losses[chunk] = loss
        following = self.layout.neighbour(self.rank, module, +1)
        if following is None:
            if self.return_outputs:
                self.outputs[(module, chunk)] = outputs
        elif following[0] == self.rank:  # the V turns on this rank: no communication
            self.inputs[(following[1], chunk)] = [t.detach().requires_grad_(self.training) for t in outputs]
            if self.training:
                self.outputs[(module, chunk)] = outputs
        else:
            self.outputs[(module, chunk)] = outputs

    def forward(self, module: int, chunk: int) -> None:
        outputs = self.pipe.module[module](*self.forward_inputs(module, chunk))
        criterion, labels = self.criterion_and_labels(module, chunk)
        tensors = [outputs] if isinstance(outputs, torch.Tensor) else list(outputs)
        loss = criterion(*tensors, *labels) if criterion is not None else None
        self.after_forward(module, chunk, tensors, loss)

    def backward_roots(self, module: int, chunk: int) -> tuple[torch.Tensor | None, Tensors, Tensors]:
        """(loss, outputs, output gradients) to backpropagate from: the loss on a
        last stage, else the outputs that received a gradient."""
        if module == self.loss_module:
            return self.losses[chunk], [], []
        key = (module, chunk)
        outputs = self.outputs[key] if self.return_outputs else self.outputs.pop(key)
        grads = self.output_grads.pop(key)
        pairs = [(t, g) for t, g in zip(outputs, grads) if g is not None and t.requires_grad]
        return None, [t for t, _ in pairs], [g for _, g in pairs]

    def after_backward(self, module: int, chunk: int) -> None:
        inputs = self.inputs.pop((module, chunk))
        previous = self.layout.neighbour(self.rank, module, -1)
        if previous is None:
            return
        if previous[0] == self.rank:  # the V's turn
            self.output_grads[(previous[1], chunk)] = [t.grad for t in inputs]
        else:  # an input that got no gradient sends zeros: the sender expects every tensor
            self.input_grads[(module, chunk)] = [torch.zeros_like(t) if t.grad is None else t.grad for t in inputs]

    def backward(self, module: int, chunk: int, zero_bubble: bool) -> None:
        loss, outputs, grads = self.backward_roots(module, chunk)
        WeightGradStore.enabled = zero_bubble
        try:
            if loss is not None:
                loss.backward()
                loss.detach_()
            elif outputs:
                run_backward(outputs, grads)
        finally:
            WeightGradStore.enabled = False
        if zero_bubble:
            WeightGradStore.flush()
            self.weights.append((module, chunk))
        self.after_backward(module, chunk)

    def forward_backward(self, op: Op) -> None:
        backward_module, backward_chunk = op.backward
        if not self.pipe.overlapped_forward_backward:
            self.forward(op.module, op.chunk)
            self.backward(backward_module, backward_chunk, zero_bubble=False)
            return
        module0 = self.pipe.module[op.module]
        inputs0 = self.forward_inputs(op.module, op.chunk)
        criterion0, labels0 = self.criterion_and_labels(op.module, op.chunk)
        loss1, outputs1, grads1 = self.backward_roots(backward_module, backward_chunk)
        outputs0, loss0 = type(module0).overlapped_forward_backward(
            module0, inputs0, criterion0, list(labels0), self.pipe.module[backward_module], loss1, outputs1, grads1
        )
        self.after_forward(op.module, op.chunk, outputs0, loss0)
        self.after_backward(backward_module, backward_chunk)

    def weight(self, module: int, chunk: int) -> None:
        if not self.weights or self.weights.popleft() != (module, chunk):
            raise AssertionError(f"rank {self.rank}: W of {module}.{chunk} is not the oldest deferred weight gradient")
        WeightGradStore.pop()

    # -- communication --------------------------------------------------------

    def peer(self, module: int, step: int) -> int:
        """Global rank holding the neighbouring stage (+1: next, -1: previous)."""
        rank, _ = self.layout.neighbour(self.rank, module, step)
        return self.pipe.global_ranks[rank]

    def queue(self, operation: Callable, tensors: Tensors, peer: int) -> None:
        self.pending += [dist.P2POp(operation, t, peer, self.pipe.group) for t in tensors]

    def recv_forward(self, module: int, chunk: int) -> None:
        buffers = comm.empty_buffers(self.pipe.device, requires_grad=self.training)
        self.inputs[(module, chunk)] = buffers
        self.queue(dist.irecv, buffers, self.peer(module, -1))

    def send_forward(self, module: int, chunk: int) -> None:
        key = (module, chunk)
        outputs = self.outputs[key] if self.training else self.outputs.pop(key)
        comm.check_outputs(f"the outputs of pipeline rank {self.rank}'s module {module}", outputs)
        self.queue(dist.isend, [t.detach().contiguous() for t in outputs], self.peer(module, +1))
        if self.training and not self.return_outputs:
            # Only the graph of a sent output is needed later: free its data once sent.
            self.to_free += [t for t in outputs if t._base is None]

    def recv_backward(self, module: int, chunk: int) -> None:
        buffers = comm.empty_buffers(self.pipe.device, requires_grad=False)
        self.output_grads[(module, chunk)] = buffers
        self.queue(dist.irecv, buffers, self.peer(module, +1))

    def send_backward(self, module: int, chunk: int) -> None:
        grads = self.input_grads.pop((module, chunk))
        self.queue(dist.isend, [g.contiguous() for g in grads], self.peer(module, -1))

    def commit(self) -> None:
        """Post the queued sends and receives as one batch and wait for all of them."""
        if not self.pending:
            return
        for work in dist.batch_isend_irecv(self.pending):
            work.wait()
        self.pending = []
        for tensor in self.to_free:
            tensor.data = torch.empty(0, dtype=tensor.dtype, device=tensor.device)
        self.to_free = []
