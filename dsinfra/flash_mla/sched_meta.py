"""FlashMLA's current scheduling flow: :class:`FlashMLASchedMeta`.

Since its 2026 interface, FlashMLA's ``get_mla_metadata()`` takes no arguments
and returns ``(FlashMLASchedMeta(), None)``: an empty object that
``flash_mla_with_kvcache`` fills on its first call (with ``num_splits=None``)
from that call's shapes, and reuses afterwards, checking that later calls have
the same shapes and flags. dsinfra keeps this flow beside the older one
(``get_mla_metadata(cache_seqlens, ...)`` returning the plan's tensors):

- on first use the configuration of the call is recorded, and the split plan
  of :func:`dsinfra.flash_mla.metadata.get_mla_metadata` is made for it (and,
  with an extra KV cache, a second plan for that cache's indices);
- a later call whose configuration differs raises ValueError naming the field.

A plan's last split of each sequence reaches "to the length at call time", so
reusing the object while the sequences grow stays correct.
"""

from __future__ import annotations

import dataclasses

import torch


@dataclasses.dataclass
class FlashMLASchedMeta:
    """Scheduling state of one decoding step, filled by the first ``flash_mla_with_kvcache`` call."""

    @dataclasses.dataclass
    class Config:
        b: int
        s_q: int
        h_q: int
        page_block_size: int
        h_k: int

        causal: bool
        is_fp8_kvcache: bool
        topk: int | None

        extra_page_block_size: int | None
        extra_topk: int | None

    have_initialized: bool = False
    config: Config | None = None
    tile_scheduler_metadata: torch.Tensor | None = None  # the plan of dsinfra.flash_mla.metadata, int32
    num_splits: torch.Tensor | None = None
    extra_tile_scheduler_metadata: torch.Tensor | None = None  # the plan of the extra KV cache's indices
    extra_num_splits: torch.Tensor | None = None


def record_or_check(sched_meta: FlashMLASchedMeta, config: FlashMLASchedMeta.Config) -> bool:
    """Record ``config`` on first use (returns True: plans are to be made), else check
    that it is the recorded one (returns False) and raise ValueError naming the first difference."""
    if not sched_meta.have_initialized:
        sched_meta.config = config
        sched_meta.have_initialized = True
        return True
    recorded = sched_meta.config
    for field in dataclasses.fields(config):
        if getattr(recorded, field.name) != getattr(config, field.name):
            raise ValueError(
                f"tile_scheduler_metadata was filled by a call with {field.name}={getattr(recorded, field.name)!r}; "
                f"this call has {field.name}={getattr(config, field.name)!r}. A FlashMLASchedMeta serves calls of "
                "one configuration: take a fresh one from get_mla_metadata() for another"
            )
    return False
