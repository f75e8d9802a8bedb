"""Bad input gets a TypeError or ValueError naming the argument."""

import pytest
import torch

from dsinfra import flash_mla

from .inputs import paged_inputs, sparse_indices


@pytest.fixture
def good():
    inputs = paged_inputs([20, 70], num_heads_q=16, head_dim=64, head_dim_v=64, seq_len_q=2, page_block_size=16)
    plan = flash_mla.get_mla_metadata(inputs.cache_seqlens, 2 * 16, 1)
    return dict(q=inputs.q, k_cache=inputs.k_cache, block_table=inputs.block_table, cache_seqlens=inputs.cache_seqlens,
                head_dim_v=64, tile_scheduler_metadata=plan[0], num_splits=plan[1]), inputs


def sparse_arguments(args, inputs, topk=8):
    indices = sparse_indices(inputs, 2, topk)
    plan = flash_mla.get_mla_metadata(inputs.cache_seqlens, 2 * 16, 1, 16, topk=topk)
    return dict(args, block_table=None, cache_seqlens=None, tile_scheduler_metadata=plan[0], num_splits=plan[1], indices=indices)


def test_good_arguments_run(good):
    args, inputs = good
    out, lse = flash_mla.flash_mla_with_kvcache(**args)
    assert out.shape == (2, 2, 16, 64) and lse.shape == (2, 16, 2)
    out, lse = flash_mla.flash_mla_with_kvcache(**sparse_arguments(args, inputs))
    assert out.shape == (2, 2, 16, 64) and lse.shape == (2, 16, 2)


@pytest.mark.parametrize(
    "change, error, message",
    [
        (lambda a: dict(a, q=a["q"].float()), TypeError, "q must have dtype bfloat16 or float16; got float32"),
        (lambda a: dict(a, q=a["q"][0]), ValueError, "q must have 4 dimensions"),
        (lambda a: dict(a, q=a["q"][:, :, :0]), ValueError, "q must have no empty dimension"),
        (lambda a: dict(a, q=a["q"].half()), TypeError, "k_cache must have dtype float16; got bfloat16"),
        (lambda a: dict(a, k_cache=a["k_cache"][..., :32]), ValueError, "k_cache must have shape"),
        (lambda a: dict(a, k_cache=a["k_cache"].expand(-1, -1, 3, -1).contiguous()), ValueError,
         r"num_heads_q \(16.*must be a multiple of num_heads_k \(3"),
        (lambda a: dict(a, head_dim_v=65), ValueError, r"head_dim_v must be in \[1, head_dim=64\]; got 65"),
        (lambda a: dict(a, head_dim_v=64.0), TypeError, "head_dim_v must be an int"),
        (lambda a: dict(a, softmax_scale="0.1"), TypeError, "softmax_scale must be a float or None"),
        (lambda a: dict(a, causal=1), TypeError, "causal must be a bool"),
        (lambda a: dict(a, block_table=a["block_table"].long()), TypeError, "block_table must have dtype int32"),
        (lambda a: dict(a, block_table=None), TypeError, "block_table must be a torch.Tensor; got NoneType"),
        (lambda a: dict(a, block_table=a["block_table"][:1]), ValueError, "block_table must have shape"),
        (lambda a: dict(a, cache_seqlens=a["cache_seqlens"].long()), TypeError, "cache_seqlens must have dtype int32"),
        (lambda a: dict(a, cache_seqlens=torch.tensor([20, -1], dtype=torch.int32)), ValueError,
         r"cache_seqlens must hold values in \[0, 97\); found -1"),
        (lambda a: dict(a, cache_seqlens=torch.tensor([20, 97], dtype=torch.int32)), ValueError,
         r"cache_seqlens must hold values in \[0, 97\); found 97"),
        (lambda a: dict(a, block_table=a["block_table"].clone().fill_(0).index_fill_(1, torch.tensor([1]), 99)), ValueError,
         r"block_table must hold values in \[0, 9\); found 99"),
        (lambda a: dict(a, num_splits=a["num_splits"][:2]), ValueError, r"num_splits must have shape \[3\]"),
        (lambda a: dict(a, tile_scheduler_metadata=a["tile_scheduler_metadata"][:, :2]), ValueError,
         r"tile_scheduler_metadata must have shape \[num_rows, 3\]"),
        (lambda a: dict(a, is_fp8_kvcache=True), TypeError, "k_cache must have dtype float8_e4m3fn or uint8"),
    ],
)
def test_bad_dense_arguments(good, change, error, message):
    args, _ = good
    with pytest.raises(error, match=message):
        flash_mla.flash_mla_with_kvcache(**change(args))


def test_caches_of_any_strides_are_read(good):
    """A plain cache may be any view; an FP8 cache needs each token's entry contiguous."""
    args, inputs = good
    out, lse = flash_mla.flash_mla_with_kvcache(**args)
    strided = inputs.k_cache.transpose(0, 1).contiguous().transpose(0, 1)  # blocks interleaved token by token
    assert not strided.is_contiguous()
    strided_out, strided_lse = flash_mla.flash_mla_with_kvcache(**dict(args, k_cache=strided))
    assert torch.equal(out, strided_out) and torch.equal(lse, strided_lse)
    fp8 = flash_mla.quantize_k_cache(inputs.k_cache, 64)
    entry_apart = torch.empty(*fp8.shape[:3], 2 * fp8.shape[3], dtype=fp8.dtype)[..., ::2]
    with pytest.raises(ValueError, match="k_cache must hold each token's entry contiguously"):
        flash_mla.flash_mla_with_kvcache(**dict(args, k_cache=entry_apart), is_fp8_kvcache=True)


def test_unused_block_table_entries_are_not_checked(good):
    args, _ = good
    assert args["block_table"][0, -1] > 2**30  # garbage past the sequence, as upstream's tests write
    flash_mla.flash_mla_with_kvcache(**args)


def test_bad_sparse_arguments(good):
    args, inputs = good
    sparse = sparse_arguments(args, inputs)
    with pytest.raises(ValueError, match="causal must be False with indices"):
        flash_mla.flash_mla_with_kvcache(**sparse, causal=True)
    bad = sparse["indices"].clone()
    bad[0, 0, 0] = 9 * 16  # 9 blocks of 16 slots
    with pytest.raises(ValueError, match=r"indices must hold values in \[0, 144\) or -1; found 144"):
        flash_mla.flash_mla_with_kvcache(**dict(sparse, indices=bad))
    with pytest.raises(ValueError, match="indices must have shape"):
        flash_mla.flash_mla_with_kvcache(**dict(sparse, indices=sparse["indices"][:, :1]))
    with pytest.raises(ValueError, match=r"num_splits must have shape \[5\]"):  # a dense plan for a sparse call
        flash_mla.flash_mla_with_kvcache(**dict(sparse, num_splits=args["num_splits"]))


def test_bad_fp8_cache(good):
    args, inputs = good
    fp8 = flash_mla.quantize_k_cache(inputs.k_cache, 64)
    assert fp8.shape[-1] == 64 + 4 + 0
    flash_mla.flash_mla_with_kvcache(**dict(args, k_cache=fp8), is_fp8_kvcache=True)
    with pytest.raises(ValueError, match="k_cache must hold 68 bytes per token for head_dim 64 and head_dim_v 64; got 60"):
        flash_mla.flash_mla_with_kvcache(**dict(args, k_cache=fp8[..., :60]), is_fp8_kvcache=True)
    with pytest.raises(ValueError, match="head_dim_v a multiple of 4"):
        flash_mla.flash_mla_with_kvcache(**dict(args, k_cache=fp8, head_dim_v=62), is_fp8_kvcache=True)
