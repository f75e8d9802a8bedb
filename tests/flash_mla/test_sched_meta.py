"""FlashMLA's current flow: get_mla_metadata() with no arguments, filled by the
first flash_mla_with_kvcache call; and the older flow beside it."""

import pytest
import torch

from dsinfra import flash_mla
from dsinfra.flash_mla import FlashMLASchedMeta

from .inputs import paged_inputs


@pytest.fixture
def inputs():
    return paged_inputs([20, 70, 0], num_heads_q=16, head_dim=64, head_dim_v=64, seq_len_q=2, page_block_size=16)


def call(inputs, sched_meta, num_splits=None, **options):
    return flash_mla.flash_mla_with_kvcache(inputs.q, inputs.k_cache, inputs.block_table, inputs.cache_seqlens, 64,
                                           sched_meta, num_splits, causal=True, **options)


def test_filled_on_first_use_and_reused(inputs):
    sched_meta, nothing = flash_mla.get_mla_metadata()
    assert isinstance(sched_meta, FlashMLASchedMeta) and nothing is None and not sched_meta.have_initialized
    out, lse = call(inputs, sched_meta)
    assert sched_meta.have_initialized
    assert sched_meta.config == FlashMLASchedMeta.Config(3, 2, 16, 16, 1, True, False, None, None, None)
    plan = sched_meta.tile_scheduler_metadata
    assert plan.dtype == torch.int32 and sched_meta.num_splits.shape == (4,)
    again = call(inputs, sched_meta)
    assert sched_meta.tile_scheduler_metadata is plan, "the plan is made once"
    old_flow = call(inputs, *flash_mla.get_mla_metadata(inputs.cache_seqlens, 2 * 16, 1))
    for result in (again, old_flow):
        assert torch.equal(result[0], out) and torch.equal(result[1], lse)


def test_other_configuration_is_refused(inputs):
    sched_meta, _ = flash_mla.get_mla_metadata()
    call(inputs, sched_meta)
    with pytest.raises(ValueError, match="filled by a call with causal=True; this call has causal=False"):
        flash_mla.flash_mla_with_kvcache(inputs.q, inputs.k_cache, inputs.block_table, inputs.cache_seqlens, 64, sched_meta)
    with pytest.raises(ValueError, match="filled by a call with b=3; this call has b=2"):
        flash_mla.flash_mla_with_kvcache(inputs.q[:2], inputs.k_cache, inputs.block_table[:2], inputs.cache_seqlens[:2], 64,
                                         sched_meta, causal=True)


def test_num_splits_must_be_none_with_sched_meta(inputs):
    _, num_splits = flash_mla.get_mla_metadata(inputs.cache_seqlens, 32, 1)
    with pytest.raises(ValueError, match="num_splits must be None with a FlashMLASchedMeta; got Tensor"):
        call(inputs, flash_mla.get_mla_metadata()[0], num_splits)


def test_old_flow_needs_its_tensors(inputs):
    with pytest.raises(TypeError, match="num_splits must be a torch.Tensor; got NoneType"):
        call(inputs, flash_mla.get_mla_metadata(inputs.cache_seqlens, 32, 1)[0], None)


def test_negative_length_is_refused_when_planning():
    with pytest.raises(ValueError, match=r"cache_seqlens must hold values in \[0, 2147483648\); found -3"):
        flash_mla.get_mla_metadata(torch.tensor([5, -3], dtype=torch.int32), 16, 1)
