"""Split-KV planning for MLA decoding: :func:`get_mla_metadata`.

A decoding step has few queries per sequence and long key sequences of uneven
lengths. One program per sequence would leave most of a GPU idle behind the
longest sequence, so the keys are cut into splits: each split is attended to
independently (online softmax over its tokens), and a combine step merges the
splits of a sequence by their log-sum-exp. The plan spreads the batch's total
key length evenly over the device's parallel units.

The two tensors are dsinfra's own format (upstream's are opaque to its users too):

- ``num_splits``: [num_sequences + 1], torch.int32, prefix sums: sequence ``v``'s
  splits are rows ``num_splits[v] .. num_splits[v + 1] - 1`` of the table. Every
  sequence has at least one split, even an empty one, so the combine step sees
  every sequence.
- ``tile_scheduler_metadata``: [num_parts + num_sequences, 3], torch.int32, one
  row per split: ``(sequence, first token, end token)``, the end exclusive, and
  ``-1`` as the end of a sequence's last split, meaning "up to the sequence's
  length at call time". Rows from ``num_splits[-1]`` on are unused and hold
  ``(-1, 0, 0)``. The row index is also where the split's partial result goes.

A "sequence" is a batch entry for dense attention. For sparse attention
(``topk`` given) it is a (batch entry, query position) pair, numbered
``b * seq_len_q + i``, whose tokens are its ``topk`` index positions: each query
position selects its own tokens.

``num_parts`` is the number of parallel units (SMs, or CPU threads) divided by
the number of programs each split occupies (KV heads times blocks of 64 query
rows), as upstream divides its SMs. Splits are a multiple of 64 tokens (the
kernels' tiles divide 64) and at least 64 long, so that one to eight sequences
of a few thousand tokens still give every SM a split: a split's partial output
(its rows times 512 float32, written and read back by the combine) costs less
than the 64 tokens of keys it saves another SM from reading. The plan is
computed with tensor operations on ``cache_seqlens``' device, without a host sync.

The reference and the PyTorch implementations do not need the plan (the PyTorch
path batches whole sequences and lets each matmul use every thread); the Triton
kernel runs one program per (split, KV head, block of query rows).
"""

from __future__ import annotations

import torch

from dsinfra import backend
from dsinfra.flash_mla.sched_meta import FlashMLASchedMeta
from dsinfra.validation import check_positive, check_range, check_tensor

ROWS_PER_PROGRAM = 64  # query rows one program of upstream's kernel serves
MIN_SPLIT_TOKENS = 64
SPLIT_MULTIPLE = 64


def num_parts(device: torch.device, num_rows_per_head_k: int, num_heads_k: int) -> int:
    """How many splits the plan aims for: parallel units per (KV head, row block)."""
    programs_per_split = num_heads_k * -(-num_rows_per_head_k // ROWS_PER_PROGRAM)
    return max(1, backend.num_parallel_units(device) // programs_per_split)


def plan_splits(lengths: torch.Tensor, parts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Cut sequences of ``lengths`` ([num_sequences], int) into splits spread over ``parts``.

    Returns (tile_scheduler_metadata [parts + num_sequences, 3], num_splits
    [num_sequences + 1]), both torch.int32, in the format of this module.
    """
    lengths = lengths.to(torch.int64).clamp(min=0)
    num_sequences = lengths.numel()
    total = lengths.sum()
    split = torch.div(total + parts - 1, parts, rounding_mode="floor").clamp(min=MIN_SPLIT_TOKENS)
    split = torch.div(split + SPLIT_MULTIPLE - 1, SPLIT_MULTIPLE, rounding_mode="floor") * SPLIT_MULTIPLE
    splits_per_sequence = torch.div(lengths + split - 1, split, rounding_mode="floor").clamp(min=1)
    num_splits = torch.zeros(num_sequences + 1, dtype=torch.int64, device=lengths.device)
    num_splits[1:] = torch.cumsum(splits_per_sequence, 0)
    # ceil(L / split) <= L / split + 1 and split >= total / parts: at most parts + num_sequences splits.
    rows = torch.arange(parts + num_sequences, device=lengths.device)
    sequence = torch.searchsorted(num_splits[1:], rows, right=True)
    used = sequence < num_sequences
    sequence = sequence.clamp(max=num_sequences - 1)
    index = rows - num_splits[sequence]
    first = index * split
    last = index == splits_per_sequence[sequence] - 1
    end = torch.where(last, -1, first + split)
    table = torch.stack([sequence, first, end], dim=1)
    table = torch.where(used[:, None], table, torch.tensor([-1, 0, 0], device=lengths.device))
    return table.to(torch.int32), num_splits.to(torch.int32)


def get_mla_metadata(
    cache_seqlens: torch.Tensor | None = None,
    num_q_tokens_per_head_k: int | None = None,
    num_heads_k: int | None = None,
    num_heads_q: int | None = None,
    is_fp8_kvcache: bool = False,
    topk: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor] | tuple[FlashMLASchedMeta, None]:
    """Plan the split-KV work of one decoding step; call once per step and pass
    the result to every layer's :func:`flash_mla_with_kvcache`.

    Called without arguments (FlashMLA's current interface), returns
    ``(FlashMLASchedMeta(), None)``, which the first ``flash_mla_with_kvcache``
    call fills (:mod:`dsinfra.flash_mla.sched_meta`).

    cache_seqlens: [batch], torch.int32, the sequences' lengths.
    num_q_tokens_per_head_k: seq_len_q * num_heads_q // num_heads_k.
    num_heads_k: number of KV heads.
    num_heads_q: number of query heads; needed with ``topk``.
    is_fp8_kvcache: accepted for upstream's signature; the plan does not depend on it.
    topk: for sparse attention, the number of indices per query: every query
        position then attends to ``topk`` tokens whatever the lengths.

    Returns (tile_scheduler_metadata, num_splits), torch.int32, on
    cache_seqlens' device; their format is described in this module's docstring.
    """
    if cache_seqlens is None and num_q_tokens_per_head_k is None and num_heads_k is None:
        return FlashMLASchedMeta(), None
    check_tensor("cache_seqlens", cache_seqlens, dtype=torch.int32, ndim=1)
    if cache_seqlens.numel() == 0:
        raise ValueError("cache_seqlens must hold at least one sequence; got an empty tensor")
    check_range("cache_seqlens", cache_seqlens, 0, 2**31)
    check_positive("num_q_tokens_per_head_k", num_q_tokens_per_head_k)
    check_positive("num_heads_k", num_heads_k)
    if not isinstance(is_fp8_kvcache, bool):
        raise TypeError(f"is_fp8_kvcache must be a bool; got {type(is_fp8_kvcache).__name__}")
    if topk is None:
        parts = num_parts(cache_seqlens.device, num_q_tokens_per_head_k, num_heads_k)
        return plan_splits(cache_seqlens, parts)
    check_positive("topk", topk)
    if num_heads_q is None:
        raise ValueError("get_mla_metadata needs num_heads_q with topk (sparse attention plans per query position)")
    check_positive("num_heads_q", num_heads_q)
    if num_heads_q % num_heads_k or (num_q_tokens_per_head_k * num_heads_k) % num_heads_q:
        raise ValueError(
            f"num_q_tokens_per_head_k ({num_q_tokens_per_head_k}) must be seq_len_q * num_heads_q // num_heads_k "
            f"with num_heads_q ({num_heads_q}) a multiple of num_heads_k ({num_heads_k})"
        )
    seq_len_q = num_q_tokens_per_head_k * num_heads_k // num_heads_q
    lengths = torch.full((cache_seqlens.numel() * seq_len_q,), topk, dtype=torch.int64, device=cache_seqlens.device)
    parts = num_parts(cache_seqlens.device, num_heads_q // num_heads_k, num_heads_k)
    return plan_splits(lengths, parts)
