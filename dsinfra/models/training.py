"""Training the model with pipeline x expert parallelism: DualPipeV across
pipeline ranks, deep_ep dispatch and combine across expert-parallel ranks.

The ``pp x ep`` ranks form a grid. Global rank ``r`` is pipeline rank
``r // ep`` and expert-parallel rank ``r % ep``:

- the ``ep`` ranks of one pipeline rank hold the same two stages (DualPipeV's
  stage ``p`` and ``2 pp - 1 - p``), each with ``1 / ep`` of every MoE
  layer's routed experts, and train on different shards of the batch (data
  parallel for everything but the experts, whose gradients come through
  deep_ep's backward);
- the ``pp`` ranks of one expert-parallel rank form a DualPipeV pipeline.

The loss of a micro-batch is its summed cross-entropy over the number of
target tokens in the whole global batch, so that the losses of all micro-batches
of all ranks add up to the global batch's mean loss, and every gradient equals
that of one process training on the whole batch.
"""

from __future__ import annotations

import dataclasses
import math
import re

import torch
import torch.distributed as dist
import torch.nn.functional as F

from dsinfra.models.config import ModelArgs
from dsinfra.models.layers import LinearFactory, plain_linear
from dsinfra.models.moe import MoE
from dsinfra.models.parallel import ExpertParallel, keep_local_experts
from dsinfra.models.stages import Stage, split_stages
from dsinfra.models.tasks import IGNORE, SortTask
from dsinfra.models.transformer import Transformer


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    args: ModelArgs = ModelArgs()
    pp: int = 2
    ep: int = 2
    steps: int = 300
    batch_size: int = 32  # sequences per global batch
    sort_length: int = 8  # tokens to sort per sequence
    num_chunks: int = 4  # DualPipeV micro-batches per rank and step (>= 2 pp)
    lr: float = 3e-3  # peak learning rate (see lr_factor)
    seed: int = 0
    fp8: bool = True  # experts through dsinfra.deep_gemm.FP8Linear
    device: str = "cpu"  # or "cuda": each rank on its current GPU, NCCL between them

    def __post_init__(self):
        if self.pp < 1 or self.ep < 1:
            raise ValueError(f"pp and ep must be >= 1; got pp={self.pp}, ep={self.ep}")
        if 2 * self.pp > self.args.n_layers:
            raise ValueError(
                f"DualPipeV on {self.pp} pipeline ranks needs {2 * self.pp} stages, one block or more each; "
                f"the model has {self.args.n_layers} layers"
            )
        if self.args.n_routed_experts % self.ep:
            raise ValueError(f"{self.args.n_routed_experts} routed experts do not split over {self.ep} expert-parallel ranks")
        if self.num_chunks < 2 * self.pp:
            raise ValueError(f"num_chunks ({self.num_chunks}) must be >= 2 x pp ({2 * self.pp}) for DualPipeV")
        if self.batch_size % (self.ep * self.num_chunks):
            raise ValueError(
                f"batch_size ({self.batch_size}) must divide into {self.ep} expert-parallel shards of {self.num_chunks} micro-batches"
            )
        if self.args.max_seq_len < 2 * self.sort_length + 1:
            raise ValueError(f"max_seq_len ({self.args.max_seq_len}) is too short for sort_length {self.sort_length}")

    @property
    def world_size(self) -> int:
        return self.pp * self.ep

    def task(self) -> SortTask:
        return SortTask(self.args.vocab_size, self.sort_length, self.batch_size, seed=self.seed)

    def expert_linear(self) -> LinearFactory:
        if not self.fp8:
            return plain_linear
        from dsinfra.deep_gemm import FP8Linear

        return lambda in_features, out_features: FP8Linear(in_features, out_features, bias=False)


def build_model(config: TrainConfig) -> Transformer:
    """The whole model, identical on every rank (same seed), on this rank's device."""
    return Transformer(config.args, config.expert_linear(), seed=config.seed).to(rank_device(config))


def rank_device(config: TrainConfig) -> torch.device:
    if config.device == "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device(config.device)


@dataclasses.dataclass
class Grid:
    """This rank's place in the pp x ep grid and its process groups."""

    pp_rank: int
    ep_rank: int
    pipeline: dist.ProcessGroup  # the pp ranks of this expert-parallel rank
    experts: dist.ProcessGroup  # the ep ranks of this pipeline rank: forward communication
    experts_backward: dist.ProcessGroup  # the same ranks: backward communication


def make_grid(rank: int, pp: int, ep: int) -> Grid:
    """Create every group on every rank (group creation is collective), keep ours."""
    pipelines = [dist.new_group([p * ep + e for p in range(pp)]) for e in range(ep)]
    forward = [dist.new_group([p * ep + e for e in range(ep)]) for p in range(pp)]
    backward = [dist.new_group([p * ep + e for e in range(ep)]) for p in range(pp)]
    pp_rank, ep_rank = divmod(rank, ep)
    return Grid(pp_rank, ep_rank, pipelines[ep_rank], forward[pp_rank], backward[pp_rank])


def rank_stages(model: Transformer, config: TrainConfig, grid: Grid) -> list[Stage]:
    """This rank's two DualPipeV stages, with its share of the experts and, with
    ep > 1, deep_ep dispatchers in their MoE layers."""
    stages = split_stages(model, 2 * config.pp)
    mine = [stages[grid.pp_rank], stages[2 * config.pp - 1 - grid.pp_rank]]
    if config.ep > 1:
        forward = expert_parallel_buffer(grid.experts, config)
        backward = expert_parallel_buffer(grid.experts_backward, config)
        for moe in stage_moe_layers(mine):
            keep_local_experts(moe, grid.ep_rank, config.ep)
            moe.dispatcher = ExpertParallel(forward, config.args.n_routed_experts, backward_buffer=backward)
    return mine


def expert_parallel_buffer(group: dist.ProcessGroup, config: TrainConfig):
    """A deep_ep Buffer for the MoE layers' dispatch and combine over ``group``.

    Mode: hierarchical where the group spans nodes evenly (as torchrun's
    ``LOCAL_WORLD_SIZE`` places its ranks), else one flat all-to-all over the
    group. Size, from the model: one call moves at most every token of a
    micro-batch to every rank, each a row of ``dim`` float32 values with its
    top-k ids and weights (and, crossing nodes, its row of ``is_token_in_rank``).
    """
    from dsinfra.deep_ep import Buffer
    from dsinfra.deep_ep.comm import member_nodes, node_major_ranks_per_node

    nodes = member_nodes(group)
    per_node = (node_major_ranks_per_node(nodes) if nodes else None) or group.size()
    tokens = config.batch_size // config.ep // config.num_chunks * config.task().seq_len
    row_bytes = 4 * config.args.dim + 12 * config.args.n_activated_experts + group.size()
    limit = tokens * group.size() * row_bytes
    rdma = limit if per_node < group.size() else 0
    return Buffer(group, num_nvl_bytes=limit, num_rdma_bytes=rdma, num_ranks_per_node=per_node)


def stage_moe_layers(stages: list[Stage]) -> list[MoE]:
    return [block.ffn for stage in stages for block in stage.layers if isinstance(block.ffn, MoE)]


_LOCAL_EXPERT = re.compile(r"(\.ffn\.experts\.experts\.)(\d+)\.")


def global_parameters(stages: list[Stage], model: Transformer, config: TrainConfig, grid: Grid) -> dict[str, torch.Tensor]:
    """This rank's parameters under their names in the whole model (local
    expert ``j`` is expert ``ep_rank * experts_per_rank + j``)."""
    named = dict(model.named_parameters())
    return _under_global_names([p for stage in stages for p in stage.parameters()], named, config, grid)


def global_state(stages: list[Stage], model: Transformer, config: TrainConfig, grid: Grid) -> dict[str, torch.Tensor]:
    """Like :func:`global_parameters`, with the persistent buffers (the gates'
    balancing biases): this rank's part of the model's ``state_dict``."""
    named = model.state_dict(keep_vars=True)
    return _under_global_names([t for stage in stages for t in stage.state_dict(keep_vars=True).values()], named, config, grid)


def _under_global_names(tensors, named: dict[str, torch.Tensor], config: TrainConfig, grid: Grid) -> dict[str, torch.Tensor]:
    names = {id(t): name for name, t in named.items()}
    offset = grid.ep_rank * (config.args.n_routed_experts // config.ep) if config.ep > 1 else 0
    return {_LOCAL_EXPERT.sub(lambda m: f"{m.group(1)}{int(m.group(2)) + offset}.", names[id(t)]): t for t in tensors}


def is_expert_parameter(name: str) -> bool:
    return _LOCAL_EXPERT.search(name) is not None


def lr_factor(step: int, steps: int, warmup: int = 20) -> float:
    """Linear warm-up over ``warmup`` steps, then a cosine decay to 0 at ``steps``."""
    return min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(step, steps) / steps))


def make_criterion(num_target_tokens: int):
    """The loss of one micro-batch: its summed cross-entropy over the global batch's target tokens."""

    def criterion(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE, reduction="sum")
        return loss / num_target_tokens

    return criterion


def reference_loss(model: Transformer, tokens: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """What the parallel step computes, in one process: the batch's mean loss."""
    return F.cross_entropy(model(tokens).flatten(0, 1), targets.flatten(), ignore_index=IGNORE)


class Trainer:
    """One rank's side of the training: its stages in a DualPipeV pipeline."""

    def __init__(self, config: TrainConfig, rank: int, recorder=None):
        from dsinfra.dualpipe import DualPipeV, set_p2p_tensor_dtype, set_p2p_tensor_shapes

        self.config = config
        self.grid = make_grid(rank, config.pp, config.ep)
        self.model = build_model(config)
        self.stages = rank_stages(self.model, config, self.grid)
        self.moe_layers = stage_moe_layers(self.stages)
        for moe in self.moe_layers:
            moe.recorder = recorder
        self.parameters = global_parameters(self.stages, self.model, config, self.grid)
        self.pipe = DualPipeV(self.stages, process_group=self.grid.pipeline)
        self.task = config.task()
        shard = config.batch_size // config.ep
        set_p2p_tensor_shapes([(shard // config.num_chunks, self.task.seq_len, config.args.dim)])
        set_p2p_tensor_dtype(torch.float32)
        self.criterion = make_criterion(config.batch_size * config.sort_length)
        self.optimizer = torch.optim.AdamW(list(self.parameters.values()), lr=config.lr, weight_decay=0.0)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda step: lr_factor(step, config.steps))

    def step(self, step: int) -> float | None:
        """One training step; returns the global batch's mean loss on
        pipeline rank 0 (where DualPipeV's last stage is), None elsewhere."""
        loss = self.forward_backward(step)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.balance_experts()
        return loss

    def forward_backward(self, step: int) -> float | None:
        """The pipeline's forward and backward over batch ``step``, gradients
        summed over the expert-parallel ranks; the loss as :meth:`step`."""
        config, grid = self.config, self.grid
        tokens, targets = (t.to(rank_device(config)) for t in self.task.batch(step))
        per_rank = config.batch_size // config.ep
        shard = slice(grid.ep_rank * per_rank, (grid.ep_rank + 1) * per_rank)
        first = grid.pp_rank == 0
        losses, _ = self.pipe.step(
            tokens[shard] if first else None,
            num_chunks=config.num_chunks,
            criterion=self.criterion,
            labels=(targets[shard],) if first else (),
        )
        self.synchronise_gradients()
        if not first:
            return None
        loss = losses.sum()
        if config.ep > 1:
            dist.all_reduce(loss, group=grid.experts)
        return float(loss)

    def synchronise_gradients(self) -> None:
        """Sum the gradients of everything but the experts over the
        expert-parallel ranks (each holds its shard of the batch's part)."""
        if self.config.ep == 1:
            return
        for name, p in self.parameters.items():
            if not is_expert_parameter(name):
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                dist.all_reduce(p.grad, group=self.grid.experts)

    def balance_experts(self) -> None:
        """The auxiliary-loss-free step of every MoE gate, from the step's
        routing counts summed over the expert-parallel ranks."""
        for moe in self.moe_layers:
            counts = moe.tokens_per_expert
            if self.config.ep > 1:
                dist.all_reduce(counts, group=self.grid.experts)
            moe.gate.update_bias(counts)
            counts.zero_()

    def gradients(self) -> dict[str, torch.Tensor]:
        return {name: p.grad.clone() for name, p in self.parameters.items() if p.grad is not None}
