"""DualPipeV on a single rank (both stages here, the V turning without
communication) and every argument check, in this process on a gloo group of one."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch import nn

from dsinfra.dualpipe import DualPipe, DualPipeV, comm, set_p2p_tensor_dtype, set_p2p_tensor_shapes
from dsinfra.dualpipe.utils import gather, scatter
from tests.dualpipe.stages import Stage, criterion
from tests.dualpipe.test_runtime import HIDDEN, MICRO_BATCH, check_step


@pytest.fixture
def world_of_one():
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    shapes, dtype = comm.TENSOR_SHAPES, comm.TENSOR_DTYPE
    set_p2p_tensor_shapes([(MICRO_BATCH, HIDDEN)])
    set_p2p_tensor_dtype(torch.float32)
    yield dist.group.WORLD
    comm.TENSOR_SHAPES, comm.TENSOR_DTYPE = shapes, dtype
    dist.destroy_process_group()


@pytest.mark.parametrize("overlapped, num_chunks", [(False, 2), (True, 5)])
def test_dualpipev_on_one_rank(world_of_one, overlapped, num_chunks):
    check_step(world_of_one, "dualpipev", overlapped, num_chunks)


def stages():
    return [Stage(HIDDEN), Stage(HIDDEN)]


def batch(chunks=2):
    return torch.randn(chunks * MICRO_BATCH, HIDDEN), torch.randn(chunks * MICRO_BATCH, HIDDEN)


def test_construction_errors(world_of_one):
    with pytest.raises(ValueError, match="DualPipe needs an even number of ranks in its process group; got 1"):
        DualPipe(stages())
    with pytest.raises(ValueError, match="modules must be two nn.Modules"):
        DualPipeV([Stage(HIDDEN)])
    with pytest.raises(ValueError, match="modules must be two nn.Modules"):
        DualPipeV(Stage(HIDDEN))
    with pytest.raises(ValueError, match="modules must be on cpu for a gloo process group; they are on meta"):
        DualPipeV([Stage(HIDDEN).to("meta"), Stage(HIDDEN).to("meta")])
    with pytest.raises(ValueError, match="modules must all live on one device; found cpu, meta"):
        DualPipeV([Stage(HIDDEN), Stage(HIDDEN).to("meta")])
    with pytest.raises(ValueError, match="rank_mapping must map the 1 ranks"):
        DualPipeV(stages(), rank_mapping=[1])
    with pytest.raises(ValueError, match="batch_dim must be >= 0; got -1"):
        DualPipeV(stages(), batch_dim=-1)


def test_step_errors(world_of_one):
    pipe = DualPipeV(stages())
    x, labels = batch()
    with pytest.raises(ValueError, match="num_chunks must be > 0; got 0"):
        pipe.step(x, criterion=criterion, labels=(labels,))
    with pytest.raises(TypeError, match="num_chunks must be an int"):
        pipe.step(x, num_chunks="2", criterion=criterion, labels=(labels,))
    with pytest.raises(ValueError, match="DualPipeV needs num_chunks >= 2 \\* num_ranks \\(2\\); got num_chunks=1"):
        pipe.step(x, num_chunks=1, criterion=criterion, labels=(labels,))
    with pytest.raises(ValueError, match="inputs\\[0\\] has 4 samples along dimension 0, which do not divide into 3 micro-batches"):
        pipe.step(x, num_chunks=3, criterion=criterion, labels=(labels,))
    with pytest.raises(ValueError, match="labels\\[0\\] has 3 samples"):
        pipe.step(x, num_chunks=2, criterion=criterion, labels=(labels[:3],))
    with pytest.raises(ValueError, match="holds a first stage: step\\(\\) needs the batch's inputs there"):
        pipe.step(None, num_chunks=2, criterion=criterion, labels=(labels,))
    with pytest.raises(ValueError, match="holds a last stage: a training step\\(\\) needs a criterion there"):
        pipe.step(x, num_chunks=2, labels=(labels,))
    comm.TENSOR_SHAPES = None
    with pytest.raises(ValueError, match="call set_p2p_tensor_shapes\\(...\\) and set_p2p_tensor_dtype\\(...\\) before step\\(\\)"):
        pipe.step(x, num_chunks=2, criterion=criterion, labels=(labels,))


def test_forward_only_without_criterion_and_several_outputs(world_of_one):
    class TwoOutputs(nn.Module):
        def forward(self, x):
            return x * 2, x + 1

    class TakeFirst(nn.Module):
        def forward(self, x, y):
            return x - y, y

    pipe = DualPipeV([TwoOutputs(), TakeFirst()])
    x = torch.arange(4 * MICRO_BATCH * HIDDEN, dtype=torch.float32).reshape(-1, HIDDEN)
    with torch.no_grad():
        loss, (a, b) = pipe.step(x, num_chunks=4, return_outputs=True)
    assert loss is None
    assert torch.equal(a, x - 1) and torch.equal(b, x + 1)


def test_needs_torch_distributed():
    if dist.is_initialized():
        pytest.skip("a process group is already initialised here")
    with pytest.raises(ValueError, match="needs torch.distributed initialised"):
        DualPipeV(stages())


def test_p2p_settings():
    with pytest.raises(ValueError, match="shapes must be a non-empty list of shapes"):
        set_p2p_tensor_shapes([])
    with pytest.raises(ValueError, match="shapes\\[1\\] must be a tuple of sizes >= 0"):
        set_p2p_tensor_shapes([(2, 3), (2, -1)])
    with pytest.raises(TypeError, match="dtype must be a torch.dtype; got str"):
        set_p2p_tensor_dtype("float32")
    saved = comm.TENSOR_SHAPES, comm.TENSOR_DTYPE
    try:
        set_p2p_tensor_shapes([torch.Size([2, 3])])
        set_p2p_tensor_dtype(torch.bfloat16)
        comm.check_outputs("outputs", [torch.zeros(2, 3, dtype=torch.bfloat16)])
        with pytest.raises(ValueError, match="must match set_p2p_tensor_shapes/set_p2p_tensor_dtype \\(\\[2, 3\\] bfloat16\\); got \\[2, 4\\] float32"):
            comm.check_outputs("outputs", [torch.zeros(2, 4)])
    finally:
        comm.TENSOR_SHAPES, comm.TENSOR_DTYPE = saved


def test_scatter_and_gather():
    x = torch.arange(12).reshape(6, 2)
    micro = scatter([x, None], 3, 0)
    assert len(micro) == 3 and micro[1][1] is None and torch.equal(micro[1][0], x[2:4])
    assert torch.equal(gather([[m[0]] for m in micro], 0)[0], x)
    with pytest.raises(TypeError, match="inputs\\[0\\] must be a torch.Tensor or None; got list"):
        scatter([[1, 2]], 2, 0)
    with pytest.raises(ValueError, match="no batch dimension 1"):
        scatter([torch.zeros(4)], 2, 1)
