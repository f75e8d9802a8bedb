"""The specification itself, against attention written out by hand in float64."""

import math

import pytest
import torch

from dsinfra.flash_mla import get_mla_metadata, reference

from .inputs import paged_inputs, sparse_indices


def call_reference(inputs, *, causal=False, indices=None, is_fp8_kvcache=False, k_cache=None):
    plan = get_mla_metadata(inputs.cache_seqlens, 1, inputs.k_cache.shape[2])  # the reference ignores the plan
    return reference.flash_mla_with_kvcache(
        inputs.q, inputs.k_cache if k_cache is None else k_cache, inputs.block_table, inputs.cache_seqlens,
        inputs.head_dim_v, *plan, inputs.q.shape[-1] ** -0.5, causal, is_fp8_kvcache, indices,
    )


def attention_by_hand(inputs, causal):
    """Loops over sequences, queries and heads, in float64."""
    batch, seq_len_q, num_heads_q, head_dim = inputs.q.shape
    heads_per_k = num_heads_q // inputs.k_cache.shape[2]
    keys_by_slot = inputs.k_cache.flatten(0, 1).double()
    out = torch.zeros(batch, seq_len_q, num_heads_q, inputs.head_dim_v, dtype=torch.float64)
    lse = torch.full((batch, num_heads_q, seq_len_q), math.inf, dtype=torch.float64)
    for b, slots in enumerate(inputs.slots):
        length = len(slots)
        for i in range(seq_len_q):
            seen = length - seq_len_q + i + 1 if causal else length
            if seen <= 0:
                continue
            for h in range(num_heads_q):
                keys = keys_by_slot[slots[:seen], h // heads_per_k]
                scores = keys @ inputs.q[b, i, h].double() / math.sqrt(head_dim)
                lse[b, h, i] = torch.logsumexp(scores, 0)
                out[b, i, h] = torch.softmax(scores, 0) @ keys[:, : inputs.head_dim_v]
    return out, lse


@pytest.mark.parametrize("causal", [False, True])
def test_matches_attention_by_hand(causal):
    inputs = paged_inputs([1, 5, 0, 37], num_heads_q=4, num_heads_k=2, head_dim=32, head_dim_v=16,
                          seq_len_q=3, page_block_size=16, dtype=torch.float16)
    out, lse = call_reference(inputs, causal=causal)
    expected_out, expected_lse = attention_by_hand(inputs, causal)
    assert out.dtype == torch.float16 and lse.dtype == torch.float32
    torch.testing.assert_close(out.double(), expected_out, atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(lse.double(), expected_lse, atol=1e-5, rtol=1e-5)


def test_one_token_gives_its_value():
    inputs = paged_inputs([1], num_heads_q=2, head_dim=32, head_dim_v=16, page_block_size=16)
    out, lse = call_reference(inputs)
    key = inputs.k_cache.flatten(0, 1)[inputs.slots[0][0], 0]
    torch.testing.assert_close(out[0, 0], key[:16].expand(2, 16))
    torch.testing.assert_close(lse[0, :, 0], inputs.q[0, 0].float() @ key.float() / math.sqrt(32))


def test_queries_that_see_nothing_give_zero_and_infinite_lse():
    inputs = paged_inputs([0, 1], num_heads_q=2, head_dim=32, head_dim_v=16, seq_len_q=2, page_block_size=16)
    out, lse = call_reference(inputs, causal=True)
    assert (out[0] == 0).all() and (lse[0] == math.inf).all()  # an empty sequence
    assert (out[1, 0] == 0).all() and (lse[1, :, 0] == math.inf).all()  # query 0 of a 1-token sequence, causal
    assert torch.isfinite(lse[1, :, 1]).all()


def test_sparse_over_all_tokens_is_dense():
    inputs = paged_inputs([3, 40, 17], num_heads_q=4, head_dim=32, head_dim_v=16, seq_len_q=2, page_block_size=16)
    topk = 48
    indices = torch.full((3, 2, topk), -1, dtype=torch.int32)
    for b, slots in enumerate(inputs.slots):
        for i in range(2):
            indices[b, i, torch.randperm(topk)[: len(slots)]] = slots.int()
    dense_out, dense_lse = call_reference(inputs)
    sparse_out, sparse_lse = call_reference(inputs, indices=indices)
    torch.testing.assert_close(sparse_out, dense_out)
    torch.testing.assert_close(sparse_lse, dense_lse)


def test_sparse_query_with_no_index_sees_nothing():
    inputs = paged_inputs([20, 9], num_heads_q=2, head_dim=32, head_dim_v=16, seq_len_q=2, page_block_size=16)
    out, lse = call_reference(inputs, indices=sparse_indices(inputs, 2, 8))
    assert (out[0, 1] == 0).all() and (lse[0, :, 1] == math.inf).all()
    assert not out.isnan().any()
