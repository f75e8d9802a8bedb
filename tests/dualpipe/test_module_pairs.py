"""DualPipe and DualPipeV take this rank's two stages in any container of two
modules: a tuple, a list, an nn.Sequential (what DeepSeek's examples pass) or
an nn.ModuleList; anything else is refused with the same message."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from dsinfra.dualpipe import DualPipeV
from tests.dualpipe.stages import Stage, criterion, reference_step
from tests.dualpipe.test_runtime import HIDDEN, MICRO_BATCH
from tests.dualpipe.test_single_process import world_of_one  # noqa: F401  (a fixture)

CONTAINERS = {
    "tuple": tuple,
    "list": list,
    "nn.Sequential": lambda stages: nn.Sequential(*stages),
    "nn.ModuleList": nn.ModuleList,
}


@pytest.mark.parametrize("container", CONTAINERS)
def test_any_container_of_two_modules(world_of_one, container):  # noqa: F811
    torch.manual_seed(0)
    stages = [Stage(HIDDEN), Stage(HIDDEN)]
    whole = copy.deepcopy(nn.Sequential(*stages))
    x = torch.randn(2 * MICRO_BATCH, HIDDEN, dtype=torch.float32)
    labels = torch.randn(2 * MICRO_BATCH, HIDDEN, dtype=torch.float32)

    pipe = DualPipeV(CONTAINERS[container](stages))
    assert list(pipe.module) == stages
    loss, outputs = pipe.step(x, num_chunks=2, criterion=criterion, labels=(labels,), return_outputs=True)

    ref_loss, ref_outputs = reference_step(whole, x, labels, 2)
    assert torch.equal(loss, ref_loss) and torch.equal(outputs, ref_outputs)
    for p, ref in zip(nn.Sequential(*stages).parameters(), whole.parameters()):
        torch.testing.assert_close(p.grad, ref.grad, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize(
    "modules",
    [Stage(HIDDEN), nn.Sequential(Stage(HIDDEN)), nn.Sequential(*[Stage(HIDDEN)] * 3), (Stage(HIDDEN), "stage"), "ab", {"a": 1}],
    ids=["one module", "Sequential of one", "Sequential of three", "not a module", "a string", "a dict"],
)
def test_anything_else_is_refused(world_of_one, modules):  # noqa: F811
    with pytest.raises(ValueError, match="modules must be two nn.Modules, this rank's two stages \\(a tuple, a list"):
        DualPipeV(modules)
