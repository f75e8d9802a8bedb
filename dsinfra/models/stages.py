"""The model cut into pipeline stages.

Stage ``i`` of ``n`` holds a contiguous run of blocks; the first also holds the
embedding and the last the final norm and the output head. Stages share their
modules with the :class:`~dsinfra.models.transformer.Transformer` they were cut
from, so a stage's parameter is the whole model's parameter of the same name.
"""

from __future__ import annotations

import threading

import torch
from torch import nn

from dsinfra.models.transformer import Transformer


class Stage(nn.Module):
    """One pipeline stage: tokens [b, s] int64 (first stage) or hidden states
    [b, s, dim] -> hidden states [b, s, dim], or logits [b, s, vocab] float32
    (last stage)."""

    def __init__(self, model: Transformer, blocks: range, *, first: bool, last: bool):
        super().__init__()
        self.block_range = blocks
        self.embed = model.embed if first else None
        self.layers = nn.ModuleList(model.layers[i] for i in blocks)
        self.norm = model.norm if last else None
        self.head = model.head if last else None
        self.register_buffer("cos", model.cos, persistent=False)
        self.register_buffer("sin", model.sin, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.embed is not None:
            x = self.embed(x)
        seq = x.shape[1]
        for block in self.layers:
            x = block(x, self.cos[:seq], self.sin[:seq])
        if self.head is not None:
            x = self.head(self.norm(x)).float()
        return x

    @classmethod
    def overlapped_forward_backward(cls, module0, inputs0, criterion0, labels0, module1, loss1, outputs1, output_grads1):
        """DualPipe's hook for its F&B cells: the forward of one micro-batch
        (``module0``) overlapped with the backward of another (``module1``).

        The backward runs on a second thread while the forward runs here, so
        whenever one waits on an expert-parallel all-to-all the other computes.
        That is safe because the two never share a collective: the MoE layers'
        forward communication goes through one deep_ep buffer and their
        backward communication through another, on a group of its own (see
        :class:`dsinfra.models.parallel.ExpertParallel`).
        """
        from dsinfra.dualpipe.utils import run_backward

        failure: list[BaseException] = []

        def backward():
            try:
                if loss1 is not None:
                    loss1.backward()
                    loss1.detach_()
                else:
                    run_backward(outputs1, output_grads1)
            except BaseException as error:  # re-raised on the calling thread
                failure.append(error)

        worker = threading.Thread(target=backward, name="dsinfra-overlapped-backward")
        worker.start()
        try:
            outputs0 = module0(*inputs0)
            outputs0 = (outputs0,) if isinstance(outputs0, torch.Tensor) else tuple(outputs0)
            loss0 = criterion0(*outputs0, *labels0) if criterion0 is not None else None
        finally:
            worker.join()
        if failure:
            raise failure[0]
        return outputs0, loss0


def split_stages(model: Transformer, num_stages: int) -> list[Stage]:
    """Cut ``model`` into ``num_stages`` stages of consecutive blocks, as even
    as the block count allows (earlier stages take the remainder)."""
    n = model.args.n_layers
    if not 1 <= num_stages <= n:
        raise ValueError(f"num_stages ({num_stages}) must be between 1 and the model's n_layers ({n})")
    sizes = [n // num_stages + (i < n % num_stages) for i in range(num_stages)]
    starts = [sum(sizes[:i]) for i in range(num_stages)]
    return [
        Stage(model, range(start, start + size), first=i == 0, last=i == num_stages - 1)
        for i, (start, size) in enumerate(zip(starts, sizes))
    ]


def stage_parameter_names(model: Transformer, stage: Stage) -> dict[str, str]:
    """For each parameter name in ``stage``, its name in ``model``."""
    by_identity = {id(p): name for name, p in model.named_parameters()}
    return {name: by_identity[id(p)] for name, p in stage.named_parameters()}
