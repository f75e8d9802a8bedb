"""Expert load statistics gathered from routing decisions: the ``weight`` that
``rebalance_experts`` plans from."""

from __future__ import annotations

import torch
import torch.distributed as dist

from dsinfra.eplb.planner import rebalance_experts
from dsinfra.eplb.routing import TOPK_DTYPES
from dsinfra.validation import check_positive, check_range, check_tensor


class ExpertLoadRecorder:
    """Per-layer, per-expert token counts from routing decisions, smoothed over
    steps, either over a sliding window or as an exponential moving average::

        recorder = ExpertLoadRecorder(num_layers, num_experts, window=32)  # or decay=0.95
        for batch in batches:
            for layer in range(num_layers):
                recorder.record(layer, topk_idx)  # the router's [num_tokens, num_topk] choices
            recorder.step()
        phy2log, log2phy, logcnt = recorder.rebalance(num_replicas, num_groups, num_nodes, num_gpus, group=group)

    window: statistics are the token counts of the last ``window`` steps, summed.
    decay: statistics are ``decay * previous + (1 - decay) * this step's counts``.
    device: where the counts live (the device the routing decisions are on);
        recording never waits for the device.

    Each rank records its own tokens; :meth:`weight` with a process group sums
    the ranks' statistics, so every rank plans from the same loads and, the
    planner being deterministic, gets the same plan.
    """

    def __init__(
        self,
        num_layers: int,
        num_experts: int,
        *,
        window: int | None = None,
        decay: float | None = None,
        device: torch.device | str = "cpu",
    ):
        check_positive("num_layers", num_layers)
        check_positive("num_experts", num_experts)
        if (window is None) == (decay is None):
            raise ValueError(
                f"give exactly one of window (a number of steps) or decay (0 <= decay < 1); got window={window}, decay={decay}"
            )
        if window is not None:
            check_positive("window", window)
        elif isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0 <= decay < 1:
            raise ValueError(f"decay must be a number in [0, 1); got {decay!r}")
        self.num_layers, self.num_experts = num_layers, num_experts
        self.window, self.decay = window, decay
        self.device = torch.device(device)
        # Counts of the step under way; the last column catches the -1 entries.
        self._pending = torch.zeros(num_layers, num_experts + 1, dtype=torch.int64, device=self.device)
        if window is not None:
            self._history = torch.zeros(window, num_layers, num_experts, dtype=torch.int64, device=self.device)
        else:
            self._average = torch.zeros(num_layers, num_experts, dtype=torch.float64, device=self.device)
        self.steps = 0

    def record(self, layer: int, topk_idx: torch.Tensor) -> None:
        """Count the tokens routed to each expert of ``layer`` in this step.

        topk_idx: [num_tokens, num_topk] (any shape), int32 or int64, on the
        recorder's device: expert ids in ``[0, num_experts)``, -1 for none.
        """
        if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < self.num_layers:
            raise ValueError(f"layer must be an int in [0, {self.num_layers}); got {layer!r}")
        check_tensor("topk_idx", topk_idx, dtype=TOPK_DTYPES, device=self.device)
        check_range("topk_idx", topk_idx, 0, self.num_experts, ignore=-1)
        experts = topk_idx.reshape(-1).to(torch.int64)
        experts = torch.where(experts >= 0, experts, self.num_experts)
        self._pending[layer].index_add_(0, experts, torch.ones_like(experts))

    def step(self) -> None:
        """Close the current step: fold its counts into the statistics."""
        counts = self._pending[:, : self.num_experts]
        if self.window is not None:
            self._history[self.steps % self.window] = counts
        else:
            self._average.mul_(self.decay).add_(counts, alpha=1 - self.decay)
        self._pending.zero_()
        self.steps += 1

    def weight(self, group: dist.ProcessGroup | None = None) -> torch.Tensor:
        """The statistics of the closed steps: [num_layers, num_experts], float64,
        on the recorder's device; summed over the ranks of ``group`` when given
        (a collective: every rank of the group must call it)."""
        if self.window is not None:
            weight = self._history.sum(0).to(torch.float64)
        else:
            weight = self._average.clone()
        if group is not None:
            dist.all_reduce(weight, group=group)
        return weight

    def rebalance(
        self, num_replicas: int, num_groups: int, num_nodes: int, num_gpus: int, *, group: dist.ProcessGroup | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``rebalance_experts(self.weight(group), ...)``: a plan for the loads seen so far."""
        return rebalance_experts(self.weight(group), num_replicas, num_groups, num_nodes, num_gpus)

    def reset(self) -> None:
        """Forget every step, e.g. after applying a new plan."""
        self._pending.zero_()
        if self.window is not None:
            self._history.zero_()
        else:
            self._average.zero_()
        self.steps = 0
