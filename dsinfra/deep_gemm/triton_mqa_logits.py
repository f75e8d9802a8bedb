"""The GPU path of the indexer scores (:mod:`dsinfra.deep_gemm.mqa_logits`) in Triton.

A program owns a tile of query rows and a block of keys. Its query rows and all
their heads form the M side of one dot, ``[rows x heads, head_dim] @ [head_dim,
keys]`` (the heads of a query are what fill a tensor-core tile, as DeepGEMM's
kernels do with 128 query-head rows). Each score is multiplied by its key's
scale, passed through relu and weighted by its query head's weight; the sum over
the heads is a reduction of the tile. Keys no row of the tile sees are not
computed: the block's logits are written as -inf when cleaning, else left alone.

The paged kernel gathers its block of keys through the block table (key ``p`` of
a sequence lives in token ``p % block_kv`` of block ``table[p // block_kv]``),
so one program's keys may span several cache blocks.

Operands reach the dot as they come, FP8 or bfloat16 (FP4 arrives decoded), on
GPUs whose ``tl.dot`` takes FP8; elsewhere FP8 operands are widened to
bfloat16 (exactly) before the launch.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dsinfra.triton_utils import CompileCase, Target, capturing, dot, launch, meta_tensor, target_for

_NEG_INF = tl.constexpr(float("-inf"))
_QUERY_HEAD_ROWS = 64  # rows x heads per tile, at least
_BLOCK_KEYS = 64


@triton.jit
def _weighted_relu_sum(
    q_ptrs, q_mask, k_ptrs, k_mask, key_scales, weights,
    BLOCK_ROWS: tl.constexpr, BLOCK_HEADS: tl.constexpr, BLOCK_KEYS: tl.constexpr,
):  # fmt: skip
    """[BLOCK_ROWS, BLOCK_KEYS] float32: for each row and key, the sum over heads of
    weights * relu((q · k) * key_scale); q rows are (row, head) pairs, row-major."""
    q = tl.load(q_ptrs, mask=q_mask, other=0.0)
    k = tl.load(k_ptrs, mask=k_mask, other=0.0)
    scores = dot(q, tl.trans(k), tl.zeros((BLOCK_ROWS * BLOCK_HEADS, BLOCK_KEYS), dtype=tl.float32))
    scores = tl.maximum(scores * key_scales[None, :], 0.0) * weights[:, None]
    return tl.sum(tl.reshape(scores, (BLOCK_ROWS, BLOCK_HEADS, BLOCK_KEYS)), axis=1)


@triton.jit
def _mqa_logits_kernel(
    q_ptr, kv_ptr, kv_scale_ptr, w_ptr, ks_ptr, ke_ptr, out_ptr,
    seq_len, seq_len_kv, num_heads, head_dim, out_columns,
    stride_qs, stride_qh, stride_qd, stride_kn, stride_kd, stride_ws, stride_wh, stride_os,
    COMPRESSED: tl.constexpr, CLEAN: tl.constexpr,
    BLOCK_ROWS: tl.constexpr, BLOCK_HEADS: tl.constexpr, BLOCK_DIM: tl.constexpr, BLOCK_KEYS: tl.constexpr,
):  # fmt: skip
    """Logits of BLOCK_ROWS queries against keys [first_key, first_key + BLOCK_KEYS):
    at column key (or key - ks[row], compressed) where ks[row] <= key < ke[row]."""
    rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    keys = tl.program_id(1) * BLOCK_KEYS + tl.arange(0, BLOCK_KEYS)
    row_mask = rows < seq_len
    starts = tl.load(ks_ptr + rows, mask=row_mask, other=0)
    ends = tl.load(ke_ptr + rows, mask=row_mask, other=0)
    first_key = tl.program_id(1) * BLOCK_KEYS
    busy = (first_key < tl.max(ends, axis=0)) & (first_key + BLOCK_KEYS > tl.min(tl.where(row_mask, starts, seq_len_kv), axis=0))
    out_rows = out_ptr + rows[:, None].to(tl.int64) * stride_os
    if busy:
        pairs = tl.arange(0, BLOCK_ROWS * BLOCK_HEADS)
        pair_rows = tl.program_id(0) * BLOCK_ROWS + pairs // BLOCK_HEADS
        heads = pairs % BLOCK_HEADS
        pair_mask = (pair_rows < seq_len) & (heads < num_heads)
        dims = tl.arange(0, BLOCK_DIM)
        q_ptrs = q_ptr + pair_rows[:, None].to(tl.int64) * stride_qs + heads[:, None] * stride_qh + dims[None, :] * stride_qd
        k_ptrs = kv_ptr + keys[:, None].to(tl.int64) * stride_kn + dims[None, :] * stride_kd
        key_mask = keys < seq_len_kv
        key_scales = tl.load(kv_scale_ptr + keys, mask=key_mask, other=0.0)
        weights = tl.load(w_ptr + pair_rows * stride_ws + heads * stride_wh, mask=pair_mask, other=0.0).to(tl.float32)
        logits = _weighted_relu_sum(
            q_ptrs, pair_mask[:, None] & (dims[None, :] < head_dim),
            k_ptrs, key_mask[:, None] & (dims[None, :] < head_dim),
            key_scales, weights, BLOCK_ROWS, BLOCK_HEADS, BLOCK_KEYS,
        )  # fmt: skip
        seen = (keys[None, :] >= starts[:, None]) & (keys[None, :] < ends[:, None]) & row_mask[:, None]
        if COMPRESSED:
            columns = keys[None, :] - starts[:, None]
            tl.store(out_rows + columns, logits.to(out_ptr.dtype.element_ty), mask=seen & (columns < out_columns))
        else:
            logits = tl.where(seen, logits, _NEG_INF)
            tl.store(out_rows + keys[None, :], logits.to(out_ptr.dtype.element_ty), mask=row_mask[:, None] & key_mask[None, :])
    elif CLEAN:
        blank = tl.full((BLOCK_ROWS, BLOCK_KEYS), _NEG_INF, dtype=out_ptr.dtype.element_ty)
        tl.store(out_rows + keys[None, :], blank, mask=row_mask[:, None] & (keys < out_columns)[None, :])


@triton.jit
def _paged_mqa_logits_kernel(
    q_ptr, kv_ptr, kv_scale_ptr, w_ptr, visible_ptr, table_ptr, out_ptr,
    next_n, num_heads, head_dim, block_kv, max_context_len,
    stride_qb, stride_qn, stride_qh, stride_qd, stride_kb, stride_kt, stride_kd, stride_sb, stride_st,
    stride_wr, stride_wh, stride_tb, stride_os,
    CLEAN: tl.constexpr,
    BLOCK_ROWS: tl.constexpr, BLOCK_HEADS: tl.constexpr, BLOCK_DIM: tl.constexpr, BLOCK_KEYS: tl.constexpr,
):  # fmt: skip
    """Logits of sequence program_id(0)'s next_n queries against its keys
    [first_key, first_key + BLOCK_KEYS); query row r sees keys < visible[r]."""
    sequence = tl.program_id(0)
    tokens = tl.arange(0, BLOCK_ROWS)
    keys = tl.program_id(1) * BLOCK_KEYS + tl.arange(0, BLOCK_KEYS)
    token_mask = tokens < next_n
    rows = sequence * next_n + tokens
    visible = tl.load(visible_ptr + rows, mask=token_mask, other=0)
    out_rows = out_ptr + rows[:, None].to(tl.int64) * stride_os
    if tl.program_id(1) * BLOCK_KEYS < tl.max(visible, axis=0):
        key_mask = keys < tl.max(visible, axis=0)
        blocks = tl.load(table_ptr + sequence * stride_tb + keys // block_kv, mask=key_mask, other=0).to(tl.int64)
        slots = keys % block_kv
        pairs = tl.arange(0, BLOCK_ROWS * BLOCK_HEADS)
        pair_tokens = pairs // BLOCK_HEADS
        heads = pairs % BLOCK_HEADS
        pair_mask = (pair_tokens < next_n) & (heads < num_heads)
        dims = tl.arange(0, BLOCK_DIM)
        q_ptrs = (
            q_ptr + sequence.to(tl.int64) * stride_qb + pair_tokens[:, None] * stride_qn
            + heads[:, None] * stride_qh + dims[None, :] * stride_qd
        )  # fmt: skip
        k_ptrs = kv_ptr + blocks[:, None] * stride_kb + slots[:, None] * stride_kt + dims[None, :] * stride_kd
        key_scales = tl.load(kv_scale_ptr + blocks * stride_sb + slots * stride_st, mask=key_mask, other=0.0)
        pair_rows = sequence * next_n + pair_tokens
        weights = tl.load(w_ptr + pair_rows * stride_wr + heads * stride_wh, mask=pair_mask, other=0.0).to(tl.float32)
        logits = _weighted_relu_sum(
            q_ptrs, pair_mask[:, None] & (dims[None, :] < head_dim),
            k_ptrs, key_mask[:, None] & (dims[None, :] < head_dim),
            key_scales, weights, BLOCK_ROWS, BLOCK_HEADS, BLOCK_KEYS,
        )  # fmt: skip
        logits = tl.where(keys[None, :] < visible[:, None], logits, _NEG_INF)
        tl.store(out_rows + keys[None, :], logits.to(out_ptr.dtype.element_ty), mask=token_mask[:, None] & (keys < max_context_len)[None, :])
    elif CLEAN:
        blank = tl.full((BLOCK_ROWS, BLOCK_KEYS), _NEG_INF, dtype=out_ptr.dtype.element_ty)
        tl.store(out_rows + keys[None, :], blank, mask=token_mask[:, None] & (keys < max_context_len)[None, :])


def _dot_operands(*tensors: torch.Tensor) -> list[torch.Tensor]:
    """The operands as the dot takes them here: FP8 as is where ``tl.dot`` takes
    float8_e4m3fn, else widened to bfloat16 (exact)."""
    if target_for(tensors[0].device).fp8_dot == "e4m3fn":
        return list(tensors)
    return [t.to(torch.bfloat16) if t.dtype == torch.float8_e4m3fn else t for t in tensors]


def _tile(rows: int, heads: int, head_dim: int) -> dict[str, int]:
    """Block sizes: all heads, enough query rows (at most ``rows``) that rows x heads
    reaches :data:`_QUERY_HEAD_ROWS`, head_dim whole; every dot side at least 16."""
    block_heads = triton.next_power_of_2(heads)
    block_rows = max(1, _QUERY_HEAD_ROWS // block_heads)
    block_rows = max(min(block_rows, triton.next_power_of_2(rows)), triton.cdiv(16, block_heads))
    return dict(BLOCK_ROWS=block_rows, BLOCK_HEADS=block_heads, BLOCK_DIM=max(16, triton.next_power_of_2(head_dim)), BLOCK_KEYS=_BLOCK_KEYS)


def mqa_logits(q, kv, kv_scales, weights, ks, ke, clean_logits, max_seqlen_k, logits_dtype) -> torch.Tensor:
    """See :func:`dsinfra.deep_gemm.fp8_fp4_mqa_logits`: a grid of query tiles by key blocks."""
    seq_len, num_heads, head_dim = q.shape
    seq_len_kv = kv.shape[0]
    columns = max_seqlen_k or seq_len_kv
    out = torch.empty(seq_len, columns, dtype=logits_dtype, device=q.device)
    if seq_len == 0 or seq_len_kv == 0:
        return out.fill_(float("-inf"))
    q, kv = _dot_operands(q, kv)
    tile = _tile(seq_len, num_heads, head_dim)
    grid = (triton.cdiv(seq_len, tile["BLOCK_ROWS"]), triton.cdiv(seq_len_kv, tile["BLOCK_KEYS"]))
    launch(
        _mqa_logits_kernel, grid,
        q, kv, kv_scales, weights, ks.contiguous(), ke.contiguous(), out,
        seq_len, seq_len_kv, num_heads, head_dim, columns,
        *q.stride(), *kv.stride(), *weights.stride(), out.stride(0),
        COMPRESSED=max_seqlen_k > 0, CLEAN=clean_logits, **tile,
    )  # fmt: skip
    return out


def paged_mqa_logits(q, kv, kv_scales, weights, visible, block_table, max_context_len, clean_logits, logits_dtype) -> torch.Tensor:
    """See :func:`dsinfra.deep_gemm.fp8_fp4_paged_mqa_logits`: a grid of sequences by key blocks."""
    batch_size, next_n, num_heads, head_dim = q.shape
    out = torch.empty(batch_size * next_n, max_context_len, dtype=logits_dtype, device=q.device)
    if out.numel() == 0:
        return out
    q, kv = _dot_operands(q, kv)
    tile = _tile(next_n, num_heads, head_dim)
    tile["BLOCK_ROWS"] = max(tile["BLOCK_ROWS"], triton.next_power_of_2(next_n))
    grid = (batch_size, triton.cdiv(max_context_len, tile["BLOCK_KEYS"]))
    launch(
        _paged_mqa_logits_kernel, grid,
        q, kv, kv_scales, weights, visible.contiguous(), block_table, out,
        next_n, num_heads, head_dim, kv.shape[1], max_context_len,
        *q.stride(), *kv.stride(), *kv_scales.stride(), *weights.stride(), block_table.stride(0), out.stride(0),
        CLEAN=clean_logits, **tile,
    )  # fmt: skip
    return out


# DeepSeek-V3.2's indexer shapes for the `kernels` report: 64 heads of 128, FP8 keys.
REPORT_HEADS, REPORT_HEAD_DIM = 64, 128
REPORT_PREFILL = ((4096, 4096), (2048, 8192))  # (queries, keys)
REPORT_DECODE = ((64, 1), (64, 2), (128, 1))  # (batch, next_n), 4096 keys in pages of 64


def compile_cases(target: Target) -> list[CompileCase]:
    """Both kernels as the V3.2 indexer launches them for ``target``: prefill over
    contiguous keys (columns compressed to each row's range or not) and decoding
    over a paged cache."""
    from dsinfra.deep_gemm.mqa_logits import _split_cache  # the paged cache's layout, as the API splits it

    cases = []
    for seq_len, seq_len_kv in REPORT_PREFILL:
        for compressed in (False, True):
            with capturing(target) as launches:
                mqa_logits(meta_tensor(seq_len, REPORT_HEADS, REPORT_HEAD_DIM, dtype=torch.float8_e4m3fn),
                           meta_tensor(seq_len_kv, REPORT_HEAD_DIM, dtype=torch.float8_e4m3fn),
                           meta_tensor(seq_len_kv, dtype=torch.float32), meta_tensor(seq_len, REPORT_HEADS, dtype=torch.float32),
                           meta_tensor(seq_len, dtype=torch.int32), meta_tensor(seq_len, dtype=torch.int32),
                           True, 1024 if compressed else 0, torch.float32)
            config = {"s_q": seq_len, "keys": seq_len_kv, "": "compressed" if compressed else "full"}
            cases.append(CompileCase(config, launches[0], representative=(seq_len, compressed) == (4096, False)))
    for batch, next_n in REPORT_DECODE:
        blocks = batch * 4096 // 64
        kv_values, kv_scales = _split_cache(meta_tensor(blocks, 64, 1, REPORT_HEAD_DIM + 4, dtype=torch.uint8), False)
        with capturing(target) as launches:
            paged_mqa_logits(meta_tensor(batch, next_n, REPORT_HEADS, REPORT_HEAD_DIM, dtype=torch.float8_e4m3fn),
                             kv_values, kv_scales,
                             meta_tensor(batch * next_n, REPORT_HEADS, dtype=torch.float32),
                             meta_tensor(batch * next_n, dtype=torch.int32), meta_tensor(batch, 4096 // 64, dtype=torch.int32),
                             4096, True, torch.float32)
        config = {"s_q": next_n, "batch": batch, "": "paged"}
        cases.append(CompileCase(config, launches[0], representative=(batch, next_n) == (64, 2)))
    return cases
