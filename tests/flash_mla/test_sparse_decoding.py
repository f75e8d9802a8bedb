"""Sparse decoding with FlashMLA's current extras (attn_sink, topk_length, an extra
KV cache), the FP8 layouts (V3.2, MODEL1) and caches whose blocks lie apart,
on every implementation against the reference."""

import math

import pytest
import torch

from dsinfra import flash_mla
from dsinfra.flash_mla import reference
from dsinfra.testing import generator

from .checks import assert_matches
from .inputs import padded_blocks, paged_inputs, sink_values, sparse_indices


def sparse_case(*, head_dim=64, head_dim_v=64, heads=16, seq_len_q=2, topk=40, extra_topk=24, page=16, extra_page=5,
                layout=None, dtype=torch.bfloat16, extra=True, sink=True, lengths=True, padded=False, seed=0):
    """Arguments of a sparse decoding call over two caches with NaN in every slot no index uses."""
    main = paged_inputs([70, 3, 0, 41], num_heads_q=heads, seq_len_q=seq_len_q, head_dim=head_dim,
                        head_dim_v=head_dim_v, page_block_size=page, dtype=dtype, seed=seed)
    more = paged_inputs([9, 30, 1, 0], num_heads_q=heads, seq_len_q=seq_len_q, head_dim=head_dim,
                        head_dim_v=head_dim_v, page_block_size=extra_page, dtype=dtype, seed=seed + 7)

    def cache_of(inputs):
        cache = inputs.k_cache if layout is None else flash_mla.quantize_k_cache(inputs.k_cache, head_dim_v, layout)
        return padded_blocks(cache) if padded else cache

    gen = generator(seed + 3)
    args = dict(q=main.q, k_cache=cache_of(main), block_table=None, cache_seqlens=None, head_dim_v=head_dim_v,
                is_fp8_kvcache=layout is not None, indices=sparse_indices(main, seq_len_q, topk, seed=seed))
    if sink:
        args["attn_sink"] = sink_values(heads, seed=seed + 4)
    if lengths:
        args["topk_length"] = torch.tensor([topk, 0, 7, 1], dtype=torch.int32)
    if extra:
        args["extra_k_cache"] = cache_of(more)
        args["extra_indices_in_kvcache"] = sparse_indices(more, seq_len_q, extra_topk, seed=seed + 5)
        if lengths:
            args["extra_topk_length"] = torch.randint(0, extra_topk + 1, (4,), generator=gen, dtype=torch.int32)
    return args


def run_and_compare(args):
    sched_meta, _ = flash_mla.get_mla_metadata()
    out, lse = flash_mla.flash_mla_with_kvcache(**args, tile_scheduler_metadata=sched_meta, num_splits=None)
    expected_out, expected_lse = reference.flash_mla_with_kvcache(
        **{k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in args.items()},
        tile_scheduler_metadata=None, num_splits=None, softmax_scale=args["q"].shape[-1] ** -0.5,
    )
    assert_matches(out, lse, expected_out, expected_lse)
    return out.cpu(), lse.cpu()


CASES = {
    "plain": dict(),
    "fp16": dict(dtype=torch.float16),
    "v32-fp8": dict(layout="v32", head_dim=160, head_dim_v=128),
    "v32-fp8-padded-blocks": dict(layout="v32", head_dim=160, head_dim_v=128, padded=True),
    "model1-fp8-padded-blocks": dict(layout="model1", head_dim=512, head_dim_v=512, heads=16, topk=24, extra_topk=16,
                                     padded=True),
    "no-extra-cache": dict(extra=False),
    "one-query-deepseek-heads": dict(head_dim=576, head_dim_v=512, heads=64, seq_len_q=1, page=64, extra_page=64,
                                     sink=False),
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_torch(monkeypatch, case):
    monkeypatch.setenv("DSINFRA_BACKEND", "torch")
    run_and_compare(sparse_case(**case))


@pytest.mark.parametrize("case", ["v32-fp8-padded-blocks", "model1-fp8-padded-blocks"])
def test_triton(monkeypatch, kernel_device, case):
    monkeypatch.setenv("DSINFRA_BACKEND", "triton")
    args = sparse_case(**CASES[case], seq_len_q=1)
    run_and_compare({k: v.to(kernel_device) if isinstance(v, torch.Tensor) else v for k, v in args.items()})


def test_reference_is_upstreams_formula():
    """Spelled out as FlashMLA's test reference states it: one softmax over both
    caches' valid keys, out scaled by 1 / (1 + exp(sink - lse)), empty rows 0 / +inf."""
    args = sparse_case(head_dim=32, head_dim_v=16, heads=4, topk=6, extra_topk=5, page=4, extra_page=3)
    out, lse = reference.flash_mla_with_kvcache(**args, tile_scheduler_metadata=None, num_splits=None, softmax_scale=0.3)
    q = args["q"].float()
    for b in range(4):
        for i in range(2):
            keys, valid = [], []
            for cache, indices, lengths in ((args["k_cache"], args["indices"], args["topk_length"]),
                                            (args["extra_k_cache"], args["extra_indices_in_kvcache"], args["extra_topk_length"])):
                page = cache.shape[1]
                for j, slot in enumerate(indices[b, i].tolist()):
                    if slot >= 0 and j < lengths[b]:
                        keys.append(cache[slot // page, slot % page, 0].float())
            if not keys:
                assert (out[b, i] == 0).all() and (lse[b, :, i] == math.inf).all()
                continue
            keys = torch.stack(keys)
            scores = q[b, i] @ keys.T * 0.3
            row_lse = scores.logsumexp(-1)
            expected = torch.softmax(scores, -1) @ keys[:, :16] / (1 + torch.exp(args["attn_sink"] - row_lse))[:, None]
            torch.testing.assert_close(lse[b, :, i], row_lse)
            torch.testing.assert_close(out[b, i].float(), expected, atol=1e-2, rtol=1e-2)


def test_sink_scales_out_and_leaves_lse(monkeypatch):
    """+inf in the sink gives out 0, -inf changes nothing; lse never moves."""
    monkeypatch.setenv("DSINFRA_BACKEND", "torch")
    args = sparse_case(extra=False, lengths=False)
    plain_out, plain_lse = run_and_compare(dict(args, attn_sink=None))
    out, lse = run_and_compare(args)
    assert torch.equal(lse, plain_lse)
    seen = plain_lse.transpose(1, 2) != math.inf  # [b, s_q, h]
    assert (out[:, :, 0][seen[:, :, 0]] == 0).all()  # sink +inf
    assert torch.equal(out[:, :, 1], plain_out[:, :, 1])  # sink -inf


def test_topk_length_is_masking_the_indices(monkeypatch):
    monkeypatch.setenv("DSINFRA_BACKEND", "torch")
    args = sparse_case(extra=False, sink=False)
    masked = args["indices"].masked_fill(torch.arange(args["indices"].shape[-1]) >= args["topk_length"][:, None, None], -1)
    out, lse = run_and_compare(args)
    masked_out, masked_lse = run_and_compare(dict(args, indices=masked, topk_length=None))
    assert torch.equal(out, masked_out) and torch.equal(lse, masked_lse)
    assert (lse[1] == math.inf).all(), "topk_length 0: nothing seen"


def test_bad_extras():
    args = sparse_case()
    call = lambda **change: flash_mla.flash_mla_with_kvcache(  # noqa: E731
        **dict(args, **change), tile_scheduler_metadata=flash_mla.get_mla_metadata()[0])
    with pytest.raises(ValueError, match="attn_sink needs sparse attention"):
        paged = paged_inputs([5], num_heads_q=16, head_dim=64, head_dim_v=64, page_block_size=16)
        flash_mla.flash_mla_with_kvcache(paged.q, paged.k_cache, paged.block_table, paged.cache_seqlens, 64,
                                         flash_mla.get_mla_metadata()[0], attn_sink=torch.zeros(16))
    with pytest.raises(TypeError, match="attn_sink must have dtype float32"):
        call(attn_sink=args["attn_sink"].double())
    with pytest.raises(ValueError, match=r"topk_length must hold values in \[0, 41\); found 41"):
        call(topk_length=torch.tensor([41, 0, 0, 0], dtype=torch.int32))
    with pytest.raises(ValueError, match="extra_k_cache and extra_indices_in_kvcache come together"):
        call(extra_indices_in_kvcache=None)
    with pytest.raises(ValueError, match=r"extra_k_cache must have shape \[num_blocks, page_block_size, num_heads_k, 64\]"):
        call(extra_k_cache=args["extra_k_cache"][:, :, :, :32])
    with pytest.raises(ValueError, match="extra_k_cache must have k_cache's dtype, heads and entry size"):
        call(extra_k_cache=args["extra_k_cache"].expand(-1, -1, 2, -1))
    with pytest.raises(ValueError, match=r"extra_indices_in_kvcache must hold values in \[0, "):
        call(extra_indices_in_kvcache=args["extra_indices_in_kvcache"] + 1000)
