"""DeepSeek-V3.2's lightning indexer: FP8 scores (DeepGEMM's MQA logits) against
the exact ones, and decoding over the cached keys selecting what a prefill
over the same tokens selects, for both ways of scoring."""

import pytest
import torch

from dsinfra.models import PagedKVCache, load_pretrained
from dsinfra.models.indexer import IndexerCache
from dsinfra.models.token_batch import decode_batch, prefill_batch
from dsinfra.testing import calc_diff, randn

pytestmark = pytest.mark.usefixtures("one_thread")

LENGTH = 13  # tokens; index_topk is 6


def _inputs(model):
    c = model.config
    return randn(LENGTH, c.hidden_size, seed=1), randn(LENGTH, c.q_lora_rank, seed=2)


def _indexer(model):
    attention = model.model.layers[1].self_attn
    return attention.indexer, attention.rotary


def test_fp8_scores_match_the_exact_scores(checkpoint):
    scores = {}
    for scoring in ("bf16", "fp8"):
        model = load_pretrained(checkpoint("v32"), indexer_scoring=scoring)
        indexer, rotary = _indexer(model)
        x, q_lora = _inputs(model)
        scores[scoring] = indexer.sequence_scores(*indexer.project(x, q_lora, rotary.angles(torch.arange(LENGTH))))
    seen = torch.ones(LENGTH, LENGTH, dtype=torch.bool).tril()
    assert torch.isinf(scores["fp8"][~seen]).all() and torch.isinf(scores["bf16"][~seen]).all()
    # FP8 (e4m3) rounds q and k to 2^-4 relative; the Hadamard rotation spreads
    # the rounding over the channels and the dot products average it out
    assert calc_diff(scores["fp8"][seen], scores["bf16"][seen]) < 1e-3


@pytest.mark.parametrize("scoring", ["bf16", "fp8"])
def test_decoding_selects_what_prefill_selects(checkpoint, scoring):
    model = load_pretrained(checkpoint("v32"), indexer_scoring=scoring)
    indexer, rotary = _indexer(model)
    x, q_lora = _inputs(model)
    c = model.config
    full = prefill_batch([LENGTH], None, "cpu")
    expected = indexer(x, q_lora, full.angles(rotary), full)[0][-1].nonzero().flatten()  # the last token's keys

    cache = PagedKVCache(c, c.num_hidden_layers, 2, LENGTH, block_size=4)  # a second sequence, to page through
    extra = {"indexer": IndexerCache(cache, c.num_hidden_layers, c.index_head_dim, model.dtype, scoring)}
    rows = list(range(LENGTH - 1))
    prefill = prefill_batch([LENGTH - 1, LENGTH - 1], cache, "cpu")
    prefill.extra = extra
    indexer(torch.cat([x[rows], x[rows].flip(0)]), torch.cat([q_lora[rows], q_lora[rows].flip(0)]), prefill.angles(rotary), prefill)
    step = decode_batch(cache)
    step.extra = extra
    slots = indexer(x[[-1, -1]], q_lora[[-1, -1]], step.angles(rotary), step)[0, 0]
    blocks = cache.block_table[0].long()
    positions = [int((blocks == s // 4).nonzero()) * 4 + s % 4 for s in slots.tolist() if s >= 0]
    assert sorted(positions) == expected.tolist()
    assert len(positions) == c.index_topk


def test_fp8_checkpoints_score_in_fp8_by_default(checkpoint):
    model = load_pretrained(checkpoint("v32-fp8"))
    assert model.indexer_scoring == "fp8" and load_pretrained(checkpoint("v32")).indexer_scoring == "bf16"
    outputs = model.generate([list(range(3, 3 + LENGTH)), [9, 8, 7]], 3, eos_token_id=(), block_size=4)
    assert [len(ids) for ids in outputs] == [3, 3]
