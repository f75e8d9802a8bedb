"""Tiny pipeline stages for the tests, with zero bubble and the overlap hook,
and the single-process reference step they are checked against (as
DualPipe's examples check)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dsinfra.dualpipe.utils import run_backward
from dsinfra.dualpipe.zero_bubble import ZeroBubbleLinear


class Stage(nn.Module):
    """A zero-bubble linear, a plain LayerNorm (its gradients come during the
    backward) and a zero-bubble linear with a bias."""

    def __init__(self, hidden: int):
        super().__init__()
        self.linear1 = ZeroBubbleLinear(hidden, 2 * hidden, bias=False)
        self.norm = nn.LayerNorm(2 * hidden)
        self.linear2 = ZeroBubbleLinear(2 * hidden, hidden)

    def forward(self, x):
        return self.linear2(F.gelu(self.norm(self.linear1(x))))


class OverlappedStage(Stage):
    """The same stage with DualPipe's overlap hook (forward first, then backward)."""

    calls = 0

    @classmethod
    def overlapped_forward_backward(cls, module0, inputs0, criterion0, labels0, module1, loss1, outputs1, output_grads1):
        cls.calls += 1
        outputs0 = module0(*inputs0)
        outputs0 = [outputs0] if isinstance(outputs0, torch.Tensor) else outputs0
        loss0 = criterion0(*outputs0, *labels0) if criterion0 is not None else None
        if loss1 is not None:
            loss1.backward()
            loss1.detach_()
        else:
            run_backward(outputs1, output_grads1)
        return outputs0, loss0


def criterion(output, target):
    return F.mse_loss(output, target).clone()


def reference_step(model, x, labels, num_chunks):
    """Micro-batch by micro-batch through the whole model: (losses [num_chunks], outputs)."""
    losses, outputs = [], []
    for micro_x, micro_l in zip(x.chunk(num_chunks), labels.chunk(num_chunks)):
        y = model(micro_x)
        loss = criterion(y, micro_l)
        loss.backward()
        losses.append(loss.detach())
        outputs.append(y.detach())
    return torch.stack(losses), torch.cat(outputs)
