"""DualPipe and DualPipeV: the pipelines users build, each rank with its two modules."""

from __future__ import annotations

from dsinfra.dualpipe import schedule
from dsinfra.dualpipe.pipeline import Pipeline


class DualPipe(Pipeline):
    """Bidirectional pipeline parallelism over ``P`` ranks (``P`` even).

    Two copies of a ``P``-stage model run in opposite directions: rank ``r``
    holds ``modules = (stage r, stage P - 1 - r)``. Half of each step's
    micro-batches enter on rank 0 and leave on rank ``P - 1``, the other half
    enter on rank ``P - 1`` and leave on rank 0. So the inputs go to ranks 0
    and ``P - 1``, and the labels of rank 0's inputs to rank ``P - 1`` (and
    vice versa), where their losses and outputs are returned.

    modules: this rank's two stages, on one device (CUDA with NCCL, CPU with gloo):
        a tuple or list of two modules, or an ``nn.Sequential`` / ``nn.ModuleList``
        of two (as DeepSeek's examples pass them).
    batch_dim: the dimension of the inputs and labels to split into micro-batches.
    process_group: the pipeline's ranks (default: the whole world).
    rank_mapping: ``rank_mapping[group rank] = pipeline rank`` (default: the same).

    Each parameter of stage ``i`` gets gradients from the micro-batches of one
    direction on each of the two ranks holding a copy (ranks ``i`` and
    ``P - 1 - i``): sum them (e.g. with an all-reduce) before the optimizer step.
    """

    build_schedule = staticmethod(schedule.dualpipe)

    def _check_num_ranks(self, num_ranks: int) -> None:
        if num_ranks % 2:
            raise ValueError(f"DualPipe needs an even number of ranks in its process group; got {num_ranks}")


class DualPipeV(Pipeline):
    """DualPipe cut in half: one model of ``2P`` stages folded into a V over
    ``P`` ranks. Rank ``r`` holds ``modules = (stage r, stage 2P - 1 - r)``, so
    rank 0 holds the first and the last stage: the inputs, the labels, the
    losses and the outputs are all on rank 0.

    Arguments as for :class:`DualPipe`; any number of ranks.
    """

    build_schedule = staticmethod(schedule.dualpipev)
