"""Every FlashMLA operation gives the same bits whatever torch's default dtype is
(FlashMLA's own tests, like many training scripts, set bfloat16 as the default)."""

import pytest
import torch

from dsinfra import flash_mla

from .inputs import paged_inputs, sink_values, sparse_indices


def make_inputs():
    """Small inputs for every operation (made under the float32 default: random draws depend on it)."""
    inputs = paged_inputs([200, 1, 0, 45], num_heads_q=16, seq_len_q=2, head_dim=160, head_dim_v=128, page_block_size=16)
    return dict(
        inputs=inputs, indices=sparse_indices(inputs, 2, 24), sinks=(sink_values(16, seed=1), sink_values(16, seed=2)),
        model1=paged_inputs([20], head_dim=512, head_dim_v=512, page_block_size=8).k_cache,
        prefill_indices=torch.randint(-2, 110, (7, 1, 12), dtype=torch.int32, generator=torch.Generator().manual_seed(0)),
    )


def all_operations(inputs, indices, sinks, model1, prefill_indices):
    """Results of every operation: dense (pieces merged), FP8, sparse with extras, prefill."""
    args = (inputs.q, inputs.k_cache, inputs.block_table, inputs.cache_seqlens, 128)
    results = list(flash_mla.get_mla_metadata(inputs.cache_seqlens, 32, 1))
    results += flash_mla.flash_mla_with_kvcache(*args, *flash_mla.get_mla_metadata(inputs.cache_seqlens, 32, 1), causal=True)
    fp8 = flash_mla.quantize_k_cache(inputs.k_cache, 128)
    results += [fp8.view(torch.uint8), flash_mla.dequantize_k_cache(fp8, 160, 128)]
    results += flash_mla.flash_mla_with_kvcache(inputs.q, fp8, *args[2:], flash_mla.get_mla_metadata()[0], is_fp8_kvcache=True,
                                                causal=True)
    results += flash_mla.flash_mla_with_kvcache(
        inputs.q, fp8, None, None, 128, flash_mla.get_mla_metadata()[0], None, is_fp8_kvcache=True, indices=indices,
        attn_sink=sinks[0], topk_length=torch.tensor([24, 0, 5, 9], dtype=torch.int32),
        extra_k_cache=fp8, extra_indices_in_kvcache=indices.flip(-1),
    )
    model1 = flash_mla.quantize_k_cache(model1, 512, "model1")
    results += [model1.view(torch.uint8), flash_mla.dequantize_k_cache(model1, 512, 512)]
    kv = inputs.k_cache.flatten(0, 1)[:100].nan_to_num()
    results += flash_mla.flash_mla_sparse_fwd(
        inputs.q[:, 0].repeat(2, 1, 1)[:7], kv, prefill_indices, 0.1, 128, attn_sink=sinks[1],
        topk_length=torch.tensor([12, 0, 3, 12, 1, 5, 7], dtype=torch.int32),
    )
    return results


@pytest.mark.parametrize("implementation", ["torch", "reference"])
def test_same_bits_under_a_bfloat16_default(monkeypatch, implementation):
    monkeypatch.setenv("DSINFRA_BACKEND", implementation)
    monkeypatch.setattr("dsinfra.flash_mla.torch_impl.MAX_WAVE_TOKENS", 96)  # sequences in pieces, merged
    inputs = make_inputs()
    expected = all_operations(**inputs)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        results = all_operations(**inputs)
    finally:
        torch.set_default_dtype(previous)
    assert len(results) == len(expected)
    for number, (result, want) in enumerate(zip(results, expected)):
        assert result.dtype == want.dtype and torch.equal(result.nan_to_num(), want.nan_to_num()), f"result {number}"


def test_sequences_longer_than_a_wave_under_a_bfloat16_default(monkeypatch):
    """The CPU path merges the pieces of a long sequence in float32, whatever the default dtype."""
    monkeypatch.setenv("DSINFRA_BACKEND", "torch")
    monkeypatch.setattr("dsinfra.flash_mla.torch_impl.MAX_WAVE_TOKENS", 64)
    inputs = paged_inputs([200, 3], num_heads_q=16, head_dim=64, head_dim_v=64, page_block_size=16)
    plan = flash_mla.get_mla_metadata(inputs.cache_seqlens, 16, 1)
    args = (inputs.q, inputs.k_cache, inputs.block_table, inputs.cache_seqlens, 64, *plan)
    expected = flash_mla.flash_mla_with_kvcache(*args)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        result = flash_mla.flash_mla_with_kvcache(*args)
    finally:
        torch.set_default_dtype(previous)
    assert all(torch.equal(a, b) for a, b in zip(result, expected))
