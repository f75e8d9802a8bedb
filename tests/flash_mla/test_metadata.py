"""get_mla_metadata: every sequence's tokens covered once, the work spread evenly."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from dsinfra.flash_mla import get_mla_metadata, metadata


def check_plan(table, num_splits, lengths, parts):
    table, num_splits, lengths = table.tolist(), num_splits.tolist(), [max(0, n) for n in lengths]
    assert len(table) == parts + len(lengths) and len(num_splits) == len(lengths) + 1
    assert num_splits[0] == 0
    split = None
    for sequence, length in enumerate(lengths):
        rows = table[num_splits[sequence]:num_splits[sequence + 1]]
        assert rows, "every sequence has a split, even an empty one"
        assert all(row[0] == sequence for row in rows)
        assert [row[1] for row in rows] == [i * (rows[1][1] if len(rows) > 1 else 0) for i in range(len(rows))]
        assert rows[-1][2] == -1 and all(row[2] == next_row[1] for row, next_row in zip(rows, rows[1:]))
        if len(rows) > 1:
            split = rows[1][1]
            assert rows[-1][1] < length <= rows[-1][1] + split
    assert all(row == [-1, 0, 0] for row in table[num_splits[-1]:])
    if split is not None:
        assert split % metadata.SPLIT_MULTIPLE == 0 and split >= metadata.MIN_SPLIT_TOKENS
        total = sum(lengths)
        assert split < max(-(-total // parts), metadata.MIN_SPLIT_TOKENS) + metadata.SPLIT_MULTIPLE


@given(st.lists(st.integers(0, 5000), min_size=1, max_size=40), st.integers(1, 300))
def test_plan_covers_every_token_once(lengths, parts):
    table, num_splits = metadata.plan_splits(torch.tensor(lengths, dtype=torch.int32), parts)
    assert table.dtype == num_splits.dtype == torch.int32
    check_plan(table, num_splits, lengths, parts)


def test_plan_spreads_long_sequences_over_the_parts():
    lengths = [66000, 100, 66000, 0]
    table, num_splits = metadata.plan_splits(torch.tensor(lengths), 132)
    assert num_splits.tolist() == [0, 65, 66, 131, 132]  # splits of ceil(132100 / 132) = 1001 -> 1024 tokens
    check_plan(table, num_splits, lengths, 132)
    table, num_splits = metadata.plan_splits(torch.tensor([8192, 100]), 132)
    assert num_splits.tolist() == [0, 128, 130]  # short batches: splits of the minimum, 64 tokens


@pytest.mark.parametrize("batch", [1, 2, 4, 8])
def test_small_batches_fill_the_sms(batch):
    """Decoding 1 to 8 sequences of 4096 tokens with 128 heads (two 64-row blocks a
    split) on 132 SMs: a split for nearly every pair of SMs (splits are whole 64-token tiles)."""
    parts = 132 // 2
    table, num_splits = metadata.plan_splits(torch.full((batch,), 4096), parts)
    assert parts * 0.95 <= int(num_splits[-1]) <= parts + batch


def test_get_mla_metadata_dense_and_sparse(monkeypatch):
    monkeypatch.setattr(metadata.backend, "num_parallel_units", lambda device: 132)
    lengths = torch.tensor([5000, 30, 700], dtype=torch.int32)
    table, num_splits = get_mla_metadata(lengths, 2 * 128, 1)  # 256 rows per KV head: 4 programs per split
    check_plan(table, num_splits, lengths.tolist(), 132 // 4)
    table, num_splits = get_mla_metadata(lengths, 2 * 64, 1, 64, topk=2048)  # sparse: 3 * 2 sequences of 2048
    check_plan(table, num_splits, [2048] * 6, 132)


def test_get_mla_metadata_bad_arguments():
    lengths = torch.tensor([5], dtype=torch.int32)
    with pytest.raises(TypeError, match="cache_seqlens must have dtype int32"):
        get_mla_metadata(lengths.long(), 16, 1)
    with pytest.raises(ValueError, match="cache_seqlens must hold at least one"):
        get_mla_metadata(lengths[:0], 16, 1)
    with pytest.raises(ValueError, match="num_heads_k must be > 0"):
        get_mla_metadata(lengths, 16, 0)
    with pytest.raises(ValueError, match="needs num_heads_q with topk"):
        get_mla_metadata(lengths, 16, 1, topk=64)
    with pytest.raises(ValueError, match="num_q_tokens_per_head_k"):
        get_mla_metadata(lengths, 24, 1, 16, topk=64)
