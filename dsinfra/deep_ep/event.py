"""Completion of asynchronous work: ``EventHandle`` and upstream's ``EventOverlap``.

Upstream's events are CUDA events on a communication stream. Here a call's
transfer is asynchronous ``torch.distributed`` work (gloo runs it on its own
threads, NCCL on its own stream); the call returns an :class:`EventOverlap`
whose :meth:`~EventOverlap.current_stream_wait` waits for that work and then
runs the step that puts what arrived into the returned tensors. Until then
those tensors hold garbage, exactly as upstream's do before the event.

Collectives are only ever issued inside the calls, in call order, so every
rank issues them in the same order whenever it chooses to wait.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch


class EventHandle:
    """Work still to be completed: ``torch.distributed`` works to wait for, then
    ``finish()`` (unpacking what arrived), or a captured CUDA event.

    Waiting is idempotent: the first call completes everything, later calls do
    nothing.
    """

    def __init__(
        self,
        works: Sequence[Any] = (),
        finish: Callable[[], None] | None = None,
        cuda_event: torch.cuda.Event | None = None,
    ):
        self._works = list(works)
        self._finish = finish
        self._cuda_event = cuda_event

    @property
    def done(self) -> bool:
        """Whether nothing is left to wait for."""
        return not self._works and self._finish is None and self._cuda_event is None

    def current_stream_wait(self) -> None:
        """Complete the work: wait for the transfers (on a GPU, make the
        current stream wait for them), then run the finishing step."""
        works, self._works = self._works, []
        for work in works:
            work.wait()
        finish, self._finish = self._finish, None
        if finish is not None:
            finish()
        cuda_event, self._cuda_event = self._cuda_event, None
        if cuda_event is not None:
            torch.cuda.current_stream().wait_event(cuda_event)


def capture() -> EventHandle:
    """The current point of the current CUDA stream (nothing to wait for where
    CUDA is not in use)."""
    if not (torch.cuda.is_available() and torch.cuda.is_initialized()):
        return EventHandle()
    event = torch.cuda.Event()
    event.record()
    return EventHandle(cuda_event=event)


class EventOverlap:
    """Upstream's wrapper around an event, for overlapping communication with
    computation::

        recv_x, ..., event = buffer.dispatch(x, ..., async_finish=True)
        with event:
            compute_something_else()
        # recv_x is ready here

    Attributes:
        event: the :class:`EventHandle` (None: nothing to wait for).
        extra_tensors: tensors kept alive until the event completes (upstream's
            substitute for ``record_stream``).
    """

    def __init__(self, event: EventHandle | None = None, extra_tensors: tuple[torch.Tensor, ...] | None = None) -> None:
        self.event = event
        self.extra_tensors = extra_tensors

    def current_stream_wait(self) -> None:
        """Wait for the event: afterwards the call's outputs are complete."""
        if self.event is not None:
            self.event.current_stream_wait()
        self.extra_tensors = None

    def __enter__(self) -> EventOverlap:
        return self

    def __exit__(self, exc_type: Any, exc_val: Any, exc_tb: Any) -> None:
        self.current_stream_wait()
