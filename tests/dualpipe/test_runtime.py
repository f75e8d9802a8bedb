"""DualPipe and DualPipeV on 2, 4 and 8 gloo ranks against a single-process
run of the whole model: losses, outputs and every parameter's gradient, with
and without the overlap hook, with zero bubble; forward-only steps; the
operations step() executes against the schedule's list."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist
from torch import nn

from dsinfra.dualpipe import DualPipe, DualPipeV, set_p2p_tensor_dtype, set_p2p_tensor_shapes
from dsinfra.testing import calc_diff, randn, spawn
from tests.dualpipe.stages import OverlappedStage, Stage, criterion, reference_step

MICRO_BATCH, HIDDEN = 2, 8


def check_step(group, kind: str, overlapped: bool, num_chunks: int, dtype=torch.float32, rank_mapping=None) -> None:
    """One training and one forward-only step of ``kind`` on ``group``, checked
    against the whole model run micro-batch by micro-batch in this process."""
    num_ranks, group_rank = dist.get_world_size(group), dist.get_rank(group)
    rank = rank_mapping[group_rank] if rank_mapping else group_rank
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(group) == "nccl" else torch.device("cpu")
    num_stages = num_ranks if kind == "dualpipe" else 2 * num_ranks
    torch.manual_seed(0)  # the same whole model on every rank
    stage_type = OverlappedStage if overlapped else Stage
    model = nn.Sequential(*[stage_type(HIDDEN) for _ in range(num_stages)]).to(device, dtype)
    x = randn(num_chunks * MICRO_BATCH, HIDDEN, seed=1, dtype=dtype, device=device)
    labels = randn(num_chunks * MICRO_BATCH, HIDDEN, seed=2, dtype=dtype, device=device)
    ref_loss, ref_outputs = reference_step(model, x, labels, num_chunks)

    mine = (model[rank], model[num_stages - 1 - rank])
    local = [copy.deepcopy(stage) for stage in mine]
    for stage in local:
        stage.zero_grad(set_to_none=True)
    pipe = (DualPipe if kind == "dualpipe" else DualPipeV)(local, process_group=group, rank_mapping=rank_mapping)
    set_p2p_tensor_shapes([(MICRO_BATCH, HIDDEN)])
    set_p2p_tensor_dtype(dtype)

    # Where inputs and labels go, and which losses and outputs come back where.
    if kind == "dualpipe":
        halves = {0: (0, 1), num_ranks - 1: (1, 0)}  # rank -> (half of the inputs, half of the labels)
        given = halves.get(rank)
        inputs = x.chunk(2)[given[0]] if given else None
        my_labels = labels.chunk(2)[given[1]] if given else None
        expected = (ref_loss.chunk(2)[given[1]], ref_outputs.chunk(2)[given[1]]) if given else None
    else:
        inputs, my_labels = (x, labels) if rank == 0 else (None, None)
        expected = (ref_loss, ref_outputs) if rank == 0 else None

    OverlappedStage.calls = 0
    loss, outputs = pipe.step(inputs, num_chunks=num_chunks, criterion=criterion, labels=(my_labels,), return_outputs=True)
    schedule = pipe.schedule(num_chunks)
    assert [i.op for i in pipe.executed] == list(schedule.ops[rank])
    assert (OverlappedStage.calls > 0) == overlapped
    if expected is None:
        assert loss is None and outputs is None
    else:
        assert torch.equal(loss, expected[0]), (loss, expected[0])
        assert torch.equal(outputs, expected[1])

    # Gradients: DualPipe has two copies of each stage (ranks i and P-1-i), one per direction.
    grads = [[p.grad.detach() for p in stage.parameters()] for stage in local]
    if kind == "dualpipe":
        partner = num_ranks - 1 - rank
        partner = rank_mapping.index(partner) if rank_mapping else partner
        from_partner = []
        for module in (0, 1):
            gathered = [[torch.empty_like(g) for _ in range(num_ranks)] for g in grads[1 - module]]
            for g, out in zip(grads[1 - module], gathered):
                dist.all_gather(out, g, group=group)
            from_partner.append([out[partner] for out in gathered])
        grads = [[g + h for g, h in zip(grads[m], from_partner[m])] for m in (0, 1)]
    bound = 1e-13 if dtype == torch.float32 else 1e-5  # DualPipe sums each gradient's two halves apart
    for stage, stage_grads in zip(mine, grads):
        for p, g in zip(stage.parameters(), stage_grads):
            assert calc_diff(g, p.grad) < bound, calc_diff(g, p.grad)

    with torch.no_grad():
        loss, outputs = pipe.step(inputs, num_chunks=num_chunks, criterion=criterion, labels=(my_labels,), return_outputs=True)
    assert [i.op for i in pipe.executed] == list(schedule.without_backward().ops[rank])
    if expected is not None:
        assert torch.equal(loss, expected[0]) and torch.equal(outputs, expected[1])


def run_cases(rank, world_size, group, cases):
    for case in cases:
        check_step(group, *case)
    return True


def run_cases_and_subgroups(rank, world_size, group, cases):
    """The cases on all four ranks, then DualPipeV and DualPipe on two pipelines
    of two ranks each, {0, 2} and {1, 3} (the demo's layout: pipeline on one
    axis, expert parallel on the other), the second with its ranks in reverse."""
    run_cases(rank, world_size, group, cases)
    pipelines = [dist.new_group([0, 2]), dist.new_group([1, 3])]
    mine = rank % 2
    with pytest.raises(ValueError, match=f"this process \\(global rank {rank}\\) is not in process_group"):
        DualPipeV([Stage(HIDDEN), Stage(HIDDEN)], process_group=pipelines[1 - mine])
    mapping = [1, 0] if mine else None
    check_step(pipelines[mine], "dualpipev", True, 4, rank_mapping=mapping)
    check_step(pipelines[mine], "dualpipe", False, 4, rank_mapping=mapping)
    return True


def test_two_ranks():
    cases = [("dualpipe", False, 4), ("dualpipe", True, 6), ("dualpipev", False, 4), ("dualpipev", True, 5, torch.bfloat16)]
    assert spawn(run_cases, 2, cases) == [True] * 2


def test_four_ranks():
    cases = [("dualpipe", True, 8), ("dualpipe", False, 10), ("dualpipev", True, 8), ("dualpipev", False, 9)]
    assert spawn(run_cases_and_subgroups, 4, cases) == [True] * 4


@pytest.mark.gpu
def test_two_gpus_with_nccl():
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two CUDA devices")
    cases = [("dualpipe", True, 4), ("dualpipev", False, 4, torch.bfloat16)]
    assert spawn(run_cases, 2, cases, backend="nccl") == [True] * 2


def test_eight_ranks():
    assert spawn(run_cases, 8, [("dualpipe", True, 16), ("dualpipe", False, 16)]) == [True] * 8
