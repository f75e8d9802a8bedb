"""The lightning indexer's scores of DeepSeek-V3.2 (DeepGEMM's "MQA logits").

For a query token ``i`` with heads ``h`` and a key token ``j`` (one key head,
shared by every query head: multi-query)::

    logits[i, j] = sum_h weights[i, h] * relu(q[i, h] · k[j] * kv_scale[j])

over the keys each query may see; the others are ``-inf`` when cleaned.
:func:`fp8_fp4_mqa_logits` scores queries against a contiguous key sequence
(prefill), :func:`fp8_fp4_paged_mqa_logits` against a paged key cache
(decoding), with :func:`get_paged_mqa_logits_metadata` computing the work split
DeepGEMM's kernels read. ``fp8_mqa_logits`` and ``fp8_paged_mqa_logits`` are
the earlier names, FP8 only.

Operands are FP8 (float8_e4m3fn; keys scaled per token by float32 scales) or
FP4 (two E2M1 codes a byte, torch.int8, with per-32 UE8M0 scales packed into an
int32 per token and head, :mod:`dsinfra.deep_gemm.fp4`). FP4 operands are
decoded into bfloat16 exactly before the scores are computed.

Each function checks its arguments (TypeError/ValueError naming the argument),
transforms them into one form (FP4 decoded; the paged cache split into values
and scales; every query row's count of visible keys) and calls the
implementation :func:`dsinfra.backend.choose` picks.
"""

from __future__ import annotations

import torch

from dsinfra import backend
from dsinfra.deep_gemm.fp4 import cast_back_from_fp4
from dsinfra.deep_gemm.operands import pair
from dsinfra.deep_gemm.utils import ceil_div
from dsinfra.validation import check_positive, check_range, check_tensor

FP4_GRAN_K = 32  # elements per UE8M0 scale of an FP4 query or key
_LOGITS_DTYPES = (torch.float32, torch.bfloat16)
_SPLIT_KV = 256  # keys per unit of work in the paged schedule


def _implementation(operation: str, device: torch.device):
    return backend.load("dsinfra.deep_gemm", backend.choose(operation, device))


def _check_flag(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool; got {type(value).__name__}")
    return value


def _check_logits_dtype(logits_dtype: object, weights: torch.Tensor) -> None:
    if logits_dtype not in _LOGITS_DTYPES:
        raise TypeError(f"logits_dtype must be torch.float32 or torch.bfloat16; got {logits_dtype}")
    if weights.dtype == torch.bfloat16 and logits_dtype != torch.bfloat16:
        raise TypeError("weights may be bfloat16 only with logits_dtype=torch.bfloat16 (DeepGEMM's rule)")


def _decode_fp4(values: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """FP4 codes [..., head_dim/2] with packed UE8M0 scales [...] -> bfloat16 [..., head_dim], exactly."""
    return cast_back_from_fp4(values, scales.unsqueeze(-1), FP4_GRAN_K, use_packed_ue8m0=True).to(torch.bfloat16)


def _query(q: tuple, shape: tuple) -> tuple[torch.Tensor, bool]:
    """Check q = (values, scales or None) of ``shape`` (head_dim last, unpacked) and
    return (the FP8 values or the decoded FP4 ones, whether FP4)."""
    values, scales = pair("q", q)
    if scales is None:
        check_tensor("q[0]", values, dtype=torch.float8_e4m3fn, shape=shape)
        return values, False
    check_tensor("q[0]", values, dtype=torch.int8, shape=(*shape[:-1], "head_dim / 2"))
    head_dim = 2 * values.shape[-1]
    if head_dim > 4 * FP4_GRAN_K:
        raise ValueError(f"an FP4 q holds at most {4 * FP4_GRAN_K} channels (4 UE8M0 scales of 32 in one int32); got {head_dim}")
    check_tensor("q[1]", scales, dtype=torch.int32, shape=values.shape[:-1], device=values.device)
    return _decode_fp4(values, scales), True


def fp8_fp4_mqa_logits(
    q: tuple[torch.Tensor, torch.Tensor | None],
    kv: tuple[torch.Tensor, torch.Tensor],
    weights: torch.Tensor,
    cu_seq_len_k_start: torch.Tensor,
    cu_seq_len_k_end: torch.Tensor,
    clean_logits: bool = True,
    max_seqlen_k: int = 0,
    logits_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Indexer scores of ``seq_len`` queries against ``seq_len_kv`` keys; query ``i``
    sees keys ``cu_seq_len_k_start[i] <= j < cu_seq_len_k_end[i]``.

    q: (``[seq_len, num_heads, head_dim]`` torch.float8_e4m3fn, None), or FP4:
        (``[seq_len, num_heads, head_dim / 2]`` torch.int8, ``[seq_len, num_heads]``
        torch.int32 packed UE8M0 scales, one per 32 channels; head_dim <= 128).
    kv: (``[seq_len_kv, head_dim]`` torch.float8_e4m3fn, ``[seq_len_kv]`` torch.float32
        scales), or FP4 like q (``[seq_len_kv, head_dim / 2]`` torch.int8,
        ``[seq_len_kv]`` torch.int32); FP4 exactly when q is.
    weights: ``[seq_len, num_heads]`` torch.float32 (or torch.bfloat16 with bfloat16 logits).
    cu_seq_len_k_start, cu_seq_len_k_end: ``[seq_len]`` torch.int32, each in
        ``[0, seq_len_kv]``; an end at or before its start sees no key.
    clean_logits: write -inf where a query sees no key; otherwise those entries
        are unspecified.
    max_seqlen_k: 0 for logits ``[seq_len, seq_len_kv]`` indexed by key; > 0 for
        compressed logits ``[seq_len, max_seqlen_k]``, entry ``[i, j]`` scoring key
        ``cu_seq_len_k_start[i] + j`` (entries past the query's range unspecified;
        needs ``clean_logits=False``).
    logits_dtype: torch.float32 or torch.bfloat16.
    Returns the logits, a new tensor of ``logits_dtype``.
    """
    q_values, is_fp4 = _query(q, ("seq_len", "num_heads", "head_dim"))
    seq_len, num_heads, head_dim = q_values.shape
    kv_values, kv_scales = pair("kv", kv)
    device = q_values.device
    if is_fp4:
        check_tensor("kv[0]", kv_values, dtype=torch.int8, shape=("seq_len_kv", head_dim // 2), device=device)
        check_tensor("kv[1]", kv_scales, dtype=torch.int32, shape=(kv_values.shape[0],), device=device)
        kv_values = _decode_fp4(kv_values, kv_scales)
        kv_scales = torch.ones(kv_values.shape[0], dtype=torch.float32, device=device)
    else:
        check_tensor("kv[0]", kv_values, dtype=torch.float8_e4m3fn, shape=("seq_len_kv", head_dim), device=device)
        check_tensor("kv[1]", kv_scales, dtype=torch.float32, shape=(kv_values.shape[0],), device=device)
    seq_len_kv = kv_values.shape[0]
    check_tensor("weights", weights, dtype=_LOGITS_DTYPES, shape=(seq_len, num_heads), device=device)
    check_tensor("cu_seq_len_k_start", cu_seq_len_k_start, dtype=torch.int32, shape=(seq_len,), device=device)
    check_tensor("cu_seq_len_k_end", cu_seq_len_k_end, dtype=torch.int32, shape=(seq_len,), device=device)
    _check_flag("clean_logits", clean_logits)
    check_positive("max_seqlen_k", max_seqlen_k, allow_zero=True)
    if max_seqlen_k > 0 and clean_logits:
        raise ValueError("clean_logits must be False with compressed logits (max_seqlen_k > 0), as in DeepGEMM")
    _check_logits_dtype(logits_dtype, weights)
    check_range("cu_seq_len_k_start", cu_seq_len_k_start, 0, seq_len_kv + 1)
    check_range("cu_seq_len_k_end", cu_seq_len_k_end, 0, seq_len_kv + 1)
    impl = _implementation("fp8_mqa_logits", device)
    return impl.mqa_logits(
        q_values, kv_values, kv_scales, weights, cu_seq_len_k_start, cu_seq_len_k_end, clean_logits, max_seqlen_k, logits_dtype
    )


def fp8_mqa_logits(
    q: torch.Tensor,
    kv: tuple[torch.Tensor, torch.Tensor],
    weights: torch.Tensor,
    cu_seq_len_k_start: torch.Tensor,
    cu_seq_len_k_end: torch.Tensor,
    clean_logits: bool = True,
    max_seqlen_k: int = 0,
) -> torch.Tensor:
    """:func:`fp8_fp4_mqa_logits` with an FP8 ``q`` tensor ``[seq_len, num_heads,
    head_dim]`` and float32 logits (DeepGEMM's first name for it)."""
    check_tensor("q", q, dtype=torch.float8_e4m3fn)
    return fp8_fp4_mqa_logits((q, None), kv, weights, cu_seq_len_k_start, cu_seq_len_k_end, clean_logits, max_seqlen_k)


def _check_context_lens(context_lens: torch.Tensor, batch_size: int | str, next_n: int | str) -> None:
    check_tensor("context_lens", context_lens, dtype=torch.int32)
    if context_lens.dim() == 1:
        check_tensor("context_lens", context_lens, shape=(batch_size,))
    else:
        check_tensor("context_lens", context_lens, shape=(batch_size, next_n))


def _check_indices(indices: torch.Tensor, batch_size: int, next_n: int, device: torch.device) -> None:
    check_tensor("indices", indices, dtype=torch.int32, shape=(batch_size,), device=device)
    if next_n != 1:
        raise ValueError(f"indices need one query token per row (next_n = 1); got next_n = {next_n}")


def get_paged_mqa_logits_metadata(
    context_lens: torch.Tensor, block_kv: int, num_sms: int, indices: torch.Tensor | None = None
) -> torch.Tensor:
    """DeepGEMM's split of paged-logits work over ``num_sms`` programs.

    context_lens: ``[batch_size]`` or ``[batch_size, next_n]`` torch.int32 (see
        :func:`fp8_fp4_paged_mqa_logits`).
    block_kv: keys per cache block (> 0); num_sms: programs (> 0).
    indices: optional ``[batch_size]`` torch.int32, each query token's sequence
        (variable-length batches, next_n = 1): consecutive tokens of one sequence
        are scheduled in pairs.
    Returns ``[num_sms + 1, 2]`` torch.int32: row ``s`` is where program ``s``
    starts, (query unit, split of 256 keys), the last row the end. dsinfra's
    kernels do not need it; it is computed as DeepGEMM computes it for its
    paged-logits kernels, for code that reads it.
    """
    _check_context_lens(context_lens, "batch_size", "next_n")
    check_positive("block_kv", block_kv)
    check_positive("num_sms", num_sms)
    batch_size = context_lens.shape[0]
    next_n = context_lens.shape[1] if context_lens.dim() == 2 else 1
    device = context_lens.device
    if indices is not None:
        _check_indices(indices, batch_size, next_n, device)
        return _varlen_schedule(context_lens.view(-1), indices, num_sms)
    lens = context_lens[:, -1] if context_lens.dim() == 2 else context_lens
    per_row = ceil_div(next_n, 2)  # units per sequence: its query tokens in pairs
    units = torch.arange(batch_size * per_row, dtype=torch.int64, device=device)
    return _schedule(_splits(lens).repeat_interleave(per_row), units, batch_size * per_row, num_sms)


def _splits(lens: torch.Tensor) -> torch.Tensor:
    """How many splits of 256 keys each length needs, as int64."""
    return (lens.to(torch.int64) + _SPLIT_KV - 1) // _SPLIT_KV


def _schedule(work: torch.Tensor, unit_ids: torch.Tensor, end_id: int, num_programs: int) -> torch.Tensor:
    """Units of ``work`` splits each, spread over ``num_programs``: each gets
    ``total // num_programs`` splits, the last ``total % num_programs`` one more.
    Row p of the result: (id of the unit where program p starts, split within it);
    one more row holds the end (end_id, 0)."""
    ends = torch.cumsum(work, 0)
    total = ends[-1] if ends.numel() else torch.zeros((), dtype=torch.int64, device=work.device)
    programs = torch.arange(num_programs + 1, dtype=torch.int64, device=work.device)
    share, extra = total // num_programs, total % num_programs
    starts = programs * share + (programs - (num_programs - extra)).clamp(min=0)
    unit = torch.searchsorted(ends, starts, right=True)
    before = torch.cat((ends.new_zeros(1), ends))[unit]
    ids = torch.cat((unit_ids, unit_ids.new_full((1,), end_id)))[unit]
    return torch.stack((ids, starts - before), dim=1).to(torch.int32)


def _varlen_schedule(context_lens: torch.Tensor, indices: torch.Tensor, num_sms: int) -> torch.Tensor:
    """The schedule of a variable-length batch: its units are pairs of consecutive
    tokens of one sequence (scored over the second one's keys), or single tokens."""
    tokens = indices.numel()
    position = torch.arange(tokens, device=indices.device)
    run_start = torch.ones(tokens, dtype=torch.bool, device=indices.device)
    run_start[1:] = indices[1:] != indices[:-1]
    position_in_run = position - torch.cummax(torch.where(run_start, position, 0), 0).values
    first = (position_in_run % 2 == 0).nonzero().squeeze(1)  # the tokens that start a unit
    second = (first + 1).clamp(max=max(tokens - 1, 0))
    paired = (first + 1 < tokens) & ~run_start[second]
    lens = context_lens[torch.where(paired, second, first)]
    return _schedule(_splits(lens), first, tokens, num_sms)


def _split_cache(kv_cache: torch.Tensor, is_fp4: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """A fused cache [num_blocks, block_kv, 1, bytes per token] -> (values
    [num_blocks, block_kv, head_dim] float8_e4m3fn, or decoded FP4 in bfloat16;
    scales [num_blocks, block_kv] float32). Each block holds its tokens' values,
    then their scales (float32, or packed UE8M0 int32 for FP4)."""
    num_blocks, block_kv, _, width = kv_cache.shape
    value_bytes = width - 4
    blocks = kv_cache.as_strided((num_blocks, block_kv * width), (kv_cache.stride(0), 1))
    values = blocks[:, : block_kv * value_bytes].unflatten(1, (block_kv, value_bytes))
    scales = blocks[:, block_kv * value_bytes :].contiguous().view(torch.int32 if is_fp4 else torch.float32)
    if not is_fp4:
        return values.view(torch.float8_e4m3fn), scales
    decoded = _decode_fp4(values.view(torch.int8), scales)
    return decoded, torch.ones(num_blocks, block_kv, dtype=torch.float32, device=kv_cache.device)


def _visible_keys(context_lens: torch.Tensor, next_n: int) -> torch.Tensor:
    """[batch_size * next_n] int32: how many leading keys each query row sees. With
    one length per sequence, its next_n queries are its last next_n tokens
    (query j sees context_len - next_n + j + 1 keys); with one per query, that."""
    if context_lens.dim() == 2:
        return context_lens.reshape(-1)
    offsets = torch.arange(1 - next_n, 1, dtype=torch.int32, device=context_lens.device)
    return (context_lens[:, None] + offsets).clamp(min=0).reshape(-1)


def _check_block_table(block_table: torch.Tensor, visible: torch.Tensor, next_n: int, block_kv: int, num_blocks: int) -> None:
    """Every block a query reads is in [0, num_blocks) (entries past them are not read)."""
    if block_table.numel() == 0 or not backend.range_checks_enabled(block_table.device):
        return
    needed = visible.view(-1, next_n).amax(dim=1).add(block_kv - 1).div(block_kv, rounding_mode="floor")
    if int(needed.max()) > block_table.shape[1]:
        raise ValueError(f"block_table must have a column for every block a query reads ({int(needed.max())}); got {block_table.shape[1]}")
    read = torch.arange(block_table.shape[1], device=block_table.device)[None, :] < needed[:, None]
    check_range("block_table", block_table[read], 0, num_blocks)


def fp8_fp4_paged_mqa_logits(
    q: tuple[torch.Tensor, torch.Tensor | None],
    kv_cache: torch.Tensor,
    weights: torch.Tensor,
    context_lens: torch.Tensor,
    block_table: torch.Tensor,
    schedule_meta: torch.Tensor,
    max_context_len: int,
    clean_logits: bool = False,
    logits_dtype: torch.dtype = torch.float32,
    indices: torch.Tensor | None = None,
) -> torch.Tensor:
    """Indexer scores of ``next_n`` query tokens per sequence against the keys in a
    paged cache (decoding, with ``next_n - 1`` speculative tokens).

    q: (``[batch_size, next_n, num_heads, head_dim]`` torch.float8_e4m3fn, None), or
        FP4: (``[batch_size, next_n, num_heads, head_dim / 2]`` torch.int8,
        ``[batch_size, next_n, num_heads]`` torch.int32 packed UE8M0 scales per 32 channels).
    kv_cache: ``[num_blocks, block_kv, 1, head_dim + 4]`` torch.uint8 (FP4:
        ``head_dim / 2 + 4``), each block its ``block_kv`` tokens' FP8 values (or FP4
        codes), then their float32 scales (or packed UE8M0 int32); tokens contiguous
        in a block (``stride(1)`` = bytes per token), blocks 4-byte aligned.
    weights: ``[batch_size * next_n, num_heads]`` torch.float32 (or torch.bfloat16
        with bfloat16 logits).
    context_lens: ``[batch_size]`` torch.int32, each sequence's length, its next_n
        queries being its last tokens (query ``j`` sees keys ``<= len - next_n + j``);
        or ``[batch_size, next_n]``, how many keys each query sees.
    block_table: ``[batch_size, max_blocks]`` torch.int32: key ``p`` of sequence ``s`` is
        token ``p % block_kv`` of cache block ``block_table[s, p // block_kv]``; only
        the entries of keys some query sees are read.
    schedule_meta: torch.int32 ``[num_sms + 1, 2]`` from :func:`get_paged_mqa_logits_metadata`
        (checked for its form; dsinfra's kernels do not need it).
    max_context_len: the logits' width, at least every context length.
    clean_logits: write -inf at every key a query does not see (otherwise those
        entries are unspecified).
    logits_dtype: torch.float32 or torch.bfloat16.
    indices: optional ``[batch_size]`` torch.int32 sequence of each row for
        variable-length batches (next_n = 1); scheduling only.
    Returns ``[batch_size * next_n, max_context_len]`` logits of ``logits_dtype``.
    """
    q_values, is_fp4 = _query(q, ("batch_size", "next_n", "num_heads", "head_dim"))
    batch_size, next_n, num_heads, head_dim = q_values.shape
    device = q_values.device
    token_bytes = head_dim // 2 + 4 if is_fp4 else head_dim + 4
    check_tensor("kv_cache", kv_cache, dtype=torch.uint8, shape=("num_blocks", "block_kv", 1, token_bytes), device=device)
    if kv_cache.stride(3) != 1 or kv_cache.stride(1) != token_bytes or kv_cache.stride(0) % 4:
        raise ValueError(
            f"kv_cache must hold each block's tokens back to back (strides [4k, {token_bytes}, *, 1]); got {list(kv_cache.stride())}"
        )
    num_blocks, block_kv = kv_cache.shape[:2]
    check_tensor("weights", weights, dtype=_LOGITS_DTYPES, shape=(batch_size * next_n, num_heads), device=device)
    _check_context_lens(context_lens, batch_size, next_n)
    check_tensor("context_lens", context_lens, device=device)
    check_tensor("block_table", block_table, dtype=torch.int32, shape=(batch_size, "max_blocks"), device=device)
    check_tensor("schedule_meta", schedule_meta, dtype=torch.int32, shape=("num_sms + 1", 2), device=device)
    check_positive("max_context_len", max_context_len, allow_zero=True)
    _check_flag("clean_logits", clean_logits)
    _check_logits_dtype(logits_dtype, weights)
    if indices is not None:
        _check_indices(indices, batch_size, next_n, device)
    check_range("context_lens", context_lens, 0, max_context_len + 1)
    visible = _visible_keys(context_lens, next_n)
    _check_block_table(block_table, visible, next_n, block_kv, num_blocks)
    kv_values, kv_scales = _split_cache(kv_cache, is_fp4)
    impl = _implementation("fp8_paged_mqa_logits", device)
    return impl.paged_mqa_logits(
        q_values, kv_values, kv_scales, weights, visible, block_table, max_context_len, clean_logits, logits_dtype
    )


def fp8_paged_mqa_logits(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    weights: torch.Tensor,
    context_lens: torch.Tensor,
    block_table: torch.Tensor,
    schedule_meta: torch.Tensor,
    max_context_len: int,
    clean_logits: bool = False,
    indices: torch.Tensor | None = None,
) -> torch.Tensor:
    """:func:`fp8_fp4_paged_mqa_logits` with an FP8 ``q`` tensor ``[batch_size, next_n,
    num_heads, head_dim]`` and float32 logits (DeepGEMM's first name for it)."""
    check_tensor("q", q, dtype=torch.float8_e4m3fn)
    return fp8_fp4_paged_mqa_logits(
        (q, None), kv_cache, weights, context_lens, block_table, schedule_meta, max_context_len, clean_logits, indices=indices
    )
