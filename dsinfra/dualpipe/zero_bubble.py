"""Zero bubble: the weight-gradient part of a backward, run later.

A module takes part through its autograd functions: while
``WeightGradStore.enabled`` is true (during a zero-bubble backward), they put
their weight-gradient computation in the store as a closure instead of
running it, and return only the input gradient. The schedule runs each
backward's closures later, in a ``W`` operation, where the pipeline would
otherwise wait. :class:`ZeroBubbleLinear` is such a module; modules that never
look at the store compute every gradient during the backward, which is correct
too, only without the gain.
"""

from __future__ import annotations

import queue
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn


class WeightGradStore:
    """The closures of deferred weight-gradient computations.

    enabled: true while a zero-bubble backward runs; autograd functions check it.
    put(fn): defer ``fn`` (call only while ``enabled``).
    flush(): close the group of closures put since the last flush (one backward's).
    pop(): run the oldest flushed group.
    clear(): drop everything (each step starts so).
    """

    enabled: bool = False
    cache: list[Callable[[], None]] = []
    funcs_queue: queue.Queue = queue.Queue()

    @classmethod
    def put(cls, func: Callable[[], None]) -> None:
        cls.cache.append(func)

    @classmethod
    def flush(cls) -> None:
        cls.funcs_queue.put(cls.cache)
        cls.cache = []

    @classmethod
    def pop(cls) -> None:
        if cls.funcs_queue.empty():
            raise RuntimeError("WeightGradStore.pop: no flushed weight-gradient group is queued")
        for func in cls.funcs_queue.get():
            func()

    @classmethod
    def clear(cls) -> None:
        cls.enabled = False
        cls.cache = []
        cls.funcs_queue = queue.Queue()


class _LinearFunction(torch.autograd.Function):
    """``F.linear`` whose weight and bias gradients go to the store when it is enabled."""

    @staticmethod
    def forward(ctx, input, weight, bias):
        ctx.save_for_backward(input, weight)
        ctx.bias = bias
        return F.linear(input, weight, bias)

    @staticmethod
    def backward(ctx, grad_output):
        input, weight = ctx.saved_tensors
        bias = ctx.bias

        def weight_grads() -> None:
            with torch.no_grad():
                flat = grad_output.reshape(-1, grad_output.shape[-1])
                _accumulate(weight, flat.T @ input.reshape(-1, input.shape[-1]))
                if bias is not None:
                    _accumulate(bias, flat.sum(0))

        if WeightGradStore.enabled:
            WeightGradStore.put(weight_grads)
        else:
            weight_grads()
        return grad_output @ weight, None, None


def _accumulate(parameter: torch.Tensor, grad: torch.Tensor) -> None:
    grad = grad.to(parameter.dtype)
    if parameter.grad is None:
        parameter.grad = grad
    else:
        parameter.grad += grad


class ZeroBubbleLinear(nn.Linear):
    """``nn.Linear`` whose weight (and bias) gradients wait in
    :class:`WeightGradStore` during a zero-bubble backward.

    x: [..., in_features] -> [..., out_features], the weight's dtype.
    """

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return _LinearFunction.apply(input, self.weight, self.bias)
