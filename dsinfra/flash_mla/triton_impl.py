"""The GPU path of MLA decoding: split-KV flash decoding in Triton.

Two kernels, following the plan of :func:`dsinfra.flash_mla.get_mla_metadata`:

- ``_split_kernel``: one program per (split, KV head, block of query rows). It
  walks the split's tokens in tiles of ``BLOCK_N``, looking each token's slot
  up in the block table (or in ``indices``), computes the scores of its query
  rows as a sum of ``BLOCK_D``-wide dots over the head dim (576 = 9 x 64, so
  registers hold one chunk at a time), and keeps an online softmax (running
  max, sum and output, float32). It writes the split's normalised output and
  log-sum-exp.
- ``_combine_kernel``: one program per (sequence, KV head, block of rows)
  merges the splits of a sequence by their log-sum-exp into the output.

Masked loads read nothing outside a sequence's tokens, so NaN in unused cache
slots never enters. With the FP8 cache the kernel dequantises each tile (fp8
times its group's scale, rounded to q's dtype) before the dots, as upstream.
Runs compiled on a GPU, and on CPU tensors under ``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from dsinfra.flash_mla.fp8_cache import split_fp8_cache
from dsinfra.fp8 import GROUP
from dsinfra.triton_utils import INTERPRETING, CompileCase, Target, capturing, dot, launch, meta_tensor

# Tiles chosen by compiling for sm_90 and reading ptxas' resource use (no GPU ran them yet):
# 32 tokens x 32 query rows for 512-wide V (a [32, 512] float32 accumulator over 8 warps spills
# under 100 bytes a thread), 32 x 64 for V up to 256 wide (no spill).
BLOCK_N = 32  # tokens per tile
BLOCK_D = 64  # head-dim channels per partial dot: 576 = 9 x 64


@triton.jit
def _cast(x, dtype: tl.constexpr):
    """``x.to(dtype)``, rounding to nearest even under the interpreter too
    (Triton 3.9's interpreter truncates float32 -> bfloat16; GPUs round)."""
    if INTERPRETING:
        if dtype == tl.bfloat16:
            bits = x.to(tl.float32).to(tl.uint32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
            x = bits.to(tl.float32, bitcast=True)
    return x.to(dtype)


@triton.jit
def _load_keys(
    nope_ptr, scale_ptr, rope_ptr, slot, head, channel, token_ok,
    nope_slot_stride, nope_head_stride, scale_slot_stride, scale_head_stride, rope_slot_stride, rope_head_stride,
    HEAD_DIM_V: tl.constexpr, CHANNELS: tl.constexpr, FP8: tl.constexpr, GROUP_SIZE: tl.constexpr, dtype: tl.constexpr,
):
    """Cache entries [BLOCK_N, len(channel)] in ``dtype`` for tokens in ``slot`` of KV
    head ``head``: channels below HEAD_DIM_V from the NoPE field (dequantised with
    FP8), channels from HEAD_DIM_V up to CHANNELS from the RoPE field, 0 elsewhere
    and for tokens not ``token_ok``."""
    in_nope = token_ok[:, None] & (channel < HEAD_DIM_V)[None, :]
    nope = tl.load(nope_ptr + slot[:, None] * nope_slot_stride + head * nope_head_stride + channel[None, :], mask=in_nope, other=0.0)
    if FP8:
        scale = tl.load(
            scale_ptr + slot[:, None] * scale_slot_stride + head * scale_head_stride + channel[None, :] // GROUP_SIZE,
            mask=in_nope, other=0.0,
        )
        nope = _cast(nope.to(tl.float32) * scale, dtype)
    in_rope = token_ok[:, None] & ((channel >= HEAD_DIM_V) & (channel < CHANNELS))[None, :]
    rope = tl.load(
        rope_ptr + slot[:, None] * rope_slot_stride + head * rope_head_stride + (channel - HEAD_DIM_V)[None, :],
        mask=in_rope, other=0.0,
    )
    return nope.to(dtype) + rope.to(dtype)


@triton.jit
def _split_kernel(
    q_ptr, q_stride_b, q_stride_s, q_stride_h,
    nope_ptr, scale_ptr, rope_ptr,
    nope_slot_stride, nope_head_stride, scale_slot_stride, scale_head_stride, rope_slot_stride, rope_head_stride,
    block_table_ptr, block_table_stride, cache_seqlens_ptr, indices_ptr, topk,
    plan_ptr, part_out_ptr, part_lse_ptr,
    scale_log2, seq_len_q, heads_per_k, rows_per_head_k, sequences_per_batch,
    PAGE: tl.constexpr, SPARSE: tl.constexpr, CAUSAL: tl.constexpr, FP8: tl.constexpr, GROUP_SIZE: tl.constexpr,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, DV_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    split = tl.program_id(0)
    head_k = tl.program_id(1)
    num_heads_k = tl.num_programs(1)
    sequence = tl.load(plan_ptr + split * 3)
    if sequence >= 0:
        dtype = q_ptr.dtype.element_ty
        batch = sequence // sequences_per_batch
        if SPARSE:
            length = topk
        else:
            length = tl.load(cache_seqlens_ptr + batch)
        begin = tl.load(plan_ptr + split * 3 + 1)
        end = tl.load(plan_ptr + split * 3 + 2)
        end = tl.where(end < 0, length, tl.minimum(end, length))

        row = tl.program_id(2) * BLOCK_M + tl.arange(0, BLOCK_M)  # query row within (sequence, KV head)
        row_ok = row < rows_per_head_k
        query = row // heads_per_k  # query position within the sequence (0 for sparse)
        head = head_k * heads_per_k + row % heads_per_k
        position = sequence % sequences_per_batch + query  # position in seq_len_q
        q_row = q_ptr + batch * q_stride_b + position * q_stride_s + head * q_stride_h
        last_visible = length - seq_len_q + position  # causal: the last token each row sees

        row_max = tl.full([BLOCK_M], float("-inf"), tl.float32)
        row_sum = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, DV_PAD], tl.float32)
        channel_v = tl.arange(0, DV_PAD)
        for start in range(begin, end, BLOCK_N):
            token = start + tl.arange(0, BLOCK_N)
            token_ok = token < end
            if SPARSE:
                slot = tl.load(indices_ptr + sequence * topk + token, mask=token_ok, other=-1)
                token_ok = token_ok & (slot >= 0)
            else:
                block = tl.load(block_table_ptr + batch * block_table_stride + token // PAGE, mask=token_ok, other=0)
                slot = block * PAGE + token % PAGE
            slot = tl.where(token_ok, slot, 0).to(tl.int64)

            scores = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
            for first_channel in tl.static_range(0, HEAD_DIM, BLOCK_D):
                channel = first_channel + tl.arange(0, BLOCK_D)
                q_chunk = tl.load(q_row[:, None] + channel[None, :], mask=row_ok[:, None] & (channel < HEAD_DIM)[None, :], other=0.0)
                k_chunk = _load_keys(
                    nope_ptr, scale_ptr, rope_ptr, slot, head_k, channel, token_ok,
                    nope_slot_stride, nope_head_stride, scale_slot_stride, scale_head_stride, rope_slot_stride, rope_head_stride,
                    HEAD_DIM_V, HEAD_DIM, FP8, GROUP_SIZE, dtype,
                )
                scores = dot(q_chunk, tl.trans(k_chunk), scores)
            visible = token_ok[None, :]
            if CAUSAL:
                visible = visible & (token[None, :] <= last_visible[:, None])
            scores = tl.where(visible, scores * scale_log2, float("-inf"))

            new_max = tl.maximum(row_max, tl.max(scores, 1))
            safe_max = tl.where(new_max == float("-inf"), 0.0, new_max)  # rows that saw nothing yet
            rescale = tl.exp2(row_max - safe_max)
            probs = tl.exp2(scores - safe_max[:, None])
            row_sum = row_sum * rescale + tl.sum(probs, 1)
            values = _load_keys(
                nope_ptr, scale_ptr, rope_ptr, slot, head_k, channel_v, token_ok,
                nope_slot_stride, nope_head_stride, scale_slot_stride, scale_head_stride, rope_slot_stride, rope_head_stride,
                HEAD_DIM_V, HEAD_DIM_V, FP8, GROUP_SIZE, dtype,
            )
            acc = dot(_cast(probs, dtype), values, acc * rescale[:, None])
            row_max = new_max

        seen = row_sum > 0
        row_sum = tl.where(seen, row_sum, 1.0)
        lse = tl.where(seen, (row_max + tl.log2(row_sum)) * 0.6931471805599453, float("-inf"))  # natural log
        out = acc / row_sum[:, None]
        part_row = (split * num_heads_k + head_k) * rows_per_head_k + row
        tl.store(part_lse_ptr + part_row, lse, mask=row_ok)
        tl.store(
            part_out_ptr + part_row[:, None] * HEAD_DIM_V + channel_v[None, :], out,
            mask=row_ok[:, None] & (channel_v < HEAD_DIM_V)[None, :],
        )


@triton.jit
def _combine_kernel(
    part_out_ptr, part_lse_ptr, num_splits_ptr,
    out_ptr, out_stride_b, out_stride_s, out_stride_h, lse_ptr, lse_stride_b, lse_stride_h, lse_stride_s,
    heads_per_k, rows_per_head_k, sequences_per_batch,
    HEAD_DIM_V: tl.constexpr, DV_PAD: tl.constexpr, BLOCK_M: tl.constexpr,
):
    sequence = tl.program_id(0)
    head_k = tl.program_id(1)
    num_heads_k = tl.num_programs(1)
    first = tl.load(num_splits_ptr + sequence)
    last = tl.load(num_splits_ptr + sequence + 1)
    row = tl.program_id(2) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = row < rows_per_head_k
    channel = tl.arange(0, DV_PAD)
    channel_ok = row_ok[:, None] & (channel < HEAD_DIM_V)[None, :]

    lse_max = tl.full([BLOCK_M], float("-inf"), tl.float32)
    for split in range(first, last):
        part_row = (split * num_heads_k + head_k) * rows_per_head_k + row
        lse_max = tl.maximum(lse_max, tl.load(part_lse_ptr + part_row, mask=row_ok, other=float("-inf")))
    safe_max = tl.where(lse_max == float("-inf"), 0.0, lse_max)
    total = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, DV_PAD], tl.float32)
    for split in range(first, last):
        part_row = (split * num_heads_k + head_k) * rows_per_head_k + row
        weight = tl.exp(tl.load(part_lse_ptr + part_row, mask=row_ok, other=float("-inf")) - safe_max)
        part = tl.load(part_out_ptr + part_row[:, None] * HEAD_DIM_V + channel[None, :], mask=channel_ok, other=0.0)
        total += weight
        acc += weight[:, None] * part

    seen = total > 0
    total = tl.where(seen, total, 1.0)
    out = acc / total[:, None]
    lse = tl.where(seen, safe_max + tl.log(total), float("inf"))
    batch = sequence // sequences_per_batch
    position = sequence % sequences_per_batch + row // heads_per_k
    head = head_k * heads_per_k + row % heads_per_k
    out_row = out_ptr + batch * out_stride_b + position * out_stride_s + head * out_stride_h
    tl.store(out_row[:, None] + channel[None, :], _cast(out, out_ptr.dtype.element_ty), mask=channel_ok)
    tl.store(lse_ptr + batch * lse_stride_b + head * lse_stride_h + position * lse_stride_s, lse, mask=row_ok)


def flash_mla_with_kvcache(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    block_table: torch.Tensor | None,
    cache_seqlens: torch.Tensor | None,
    head_dim_v: int,
    tile_scheduler_metadata: torch.Tensor,
    num_splits: torch.Tensor,
    softmax_scale: float,
    causal: bool = False,
    is_fp8_kvcache: bool = False,
    indices: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Arguments as :func:`dsinfra.flash_mla.flash_mla_with_kvcache`, already
    checked, with ``softmax_scale`` a float and the plan made for this batch."""
    q = q.contiguous()
    batch, seq_len_q, num_heads_q, head_dim = q.shape
    _, page_block_size, num_heads_k, _ = k_cache.shape
    sparse = indices is not None
    if sparse:
        indices = indices.contiguous()
    else:
        block_table = block_table.contiguous()
    # A "sequence" is a batch entry, or (sparse) a (batch entry, query position) pair.
    heads_per_k = num_heads_q // num_heads_k
    sequences_per_batch, rows_per_head_k = (seq_len_q, heads_per_k) if sparse else (1, seq_len_q * heads_per_k)
    sequences = batch * sequences_per_batch
    if is_fp8_kvcache:
        nope, scales, rope = split_fp8_cache(k_cache, head_dim, head_dim_v)
    else:
        nope = scales = k_cache
        rope = k_cache[..., head_dim_v:] if head_dim > head_dim_v else k_cache
    dummy = torch.empty(1, dtype=torch.int32, device=q.device)

    num_rows = tile_scheduler_metadata.shape[0]
    part_out = torch.empty(num_rows, num_heads_k, rows_per_head_k, head_dim_v, dtype=torch.float32, device=q.device)
    part_lse = torch.empty(num_rows, num_heads_k, rows_per_head_k, dtype=torch.float32, device=q.device)
    out = torch.empty(batch, seq_len_q, num_heads_q, head_dim_v, dtype=q.dtype, device=q.device)
    lse = torch.empty(batch, num_heads_q, seq_len_q, dtype=torch.float32, device=q.device)

    dv_pad = triton.next_power_of_2(head_dim_v)
    block_m = min(32 if dv_pad >= 512 else 64, max(16, triton.next_power_of_2(rows_per_head_k)))
    num_warps = 8
    num_stages = 1 if dv_pad >= 512 else 2  # pipelining 512-wide FP8 tiles would need 211 KiB of shared memory
    row_blocks = triton.cdiv(rows_per_head_k, block_m)
    launch(
        _split_kernel, (num_rows, num_heads_k, row_blocks),
        q, q.stride(0), q.stride(1), q.stride(2),
        nope, scales, rope,
        nope.stride(1), nope.stride(2), scales.stride(1), scales.stride(2), rope.stride(1), rope.stride(2),
        block_table if not sparse else dummy, block_table.stride(0) if not sparse else 0,
        cache_seqlens if not sparse else dummy, indices if sparse else dummy, indices.shape[2] if sparse else 0,
        tile_scheduler_metadata, part_out, part_lse,
        softmax_scale * math.log2(math.e), seq_len_q, heads_per_k, rows_per_head_k, sequences_per_batch,
        PAGE=page_block_size, SPARSE=sparse, CAUSAL=causal and seq_len_q > 1, FP8=is_fp8_kvcache, GROUP_SIZE=GROUP,
        HEAD_DIM=head_dim, HEAD_DIM_V=head_dim_v, DV_PAD=dv_pad,
        BLOCK_M=block_m, BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D, num_warps=num_warps, num_stages=num_stages,
    )
    launch(
        _combine_kernel, (sequences, num_heads_k, row_blocks),
        part_out, part_lse, num_splits,
        out, out.stride(0), out.stride(1), out.stride(2), lse, lse.stride(0), lse.stride(1), lse.stride(2),
        heads_per_k, rows_per_head_k, sequences_per_batch,
        HEAD_DIM_V=head_dim_v, DV_PAD=dv_pad, BLOCK_M=block_m, num_warps=num_warps,
    )
    return out, lse


# DeepSeek-V3's decoding shapes for the `kernels` report: MLA heads of 576/512, one
# KV head, 64-token pages, 4096 cached tokens per sequence, sparse top-2048.
REPORT_HEADS = (16, 64, 128)
REPORT_BATCHES = (1, 8, 64, 128)
REPORT_SEQLEN, REPORT_TOPK, REPORT_PAGE = 4096, 2048, 64


def compile_cases(target: Target) -> list[CompileCase]:
    """Both kernels as a decoding call launches them for ``target``: 16, 64 and 128
    heads, s_q 1 and 2 (causal), bf16 and FP8 cache, dense and sparse, batch 1..128."""
    from dsinfra.flash_mla.fp8_cache import bytes_per_token

    head_dim, head_dim_v = 576, 512
    cases = []
    for heads in REPORT_HEADS:
        for seq_len_q in (1, 2):
            for fp8 in (False, True):
                for sparse in (False, True):
                    for batch in REPORT_BATCHES:
                        blocks = batch * REPORT_SEQLEN // REPORT_PAGE
                        entry = bytes_per_token(head_dim, head_dim_v) if fp8 else head_dim
                        q = meta_tensor(batch, seq_len_q, heads, head_dim, dtype=torch.bfloat16)
                        k_cache = meta_tensor(blocks, REPORT_PAGE, 1, entry, dtype=torch.float8_e4m3fn if fp8 else torch.bfloat16)
                        block_table = meta_tensor(batch, REPORT_SEQLEN // REPORT_PAGE, dtype=torch.int32)
                        lengths = meta_tensor(batch, dtype=torch.int32)
                        indices = meta_tensor(batch, seq_len_q, REPORT_TOPK, dtype=torch.int32) if sparse else None
                        sequences = batch * (seq_len_q if sparse else 1)
                        plan = meta_tensor(target.num_sms + sequences, 3, dtype=torch.int32)
                        num_splits = meta_tensor(sequences + 1, dtype=torch.int32)
                        with capturing(target) as launches:
                            flash_mla_with_kvcache(q, k_cache, block_table, lengths, head_dim_v, plan, num_splits,
                                                   head_dim**-0.5, causal=seq_len_q > 1 and not sparse,
                                                   is_fp8_kvcache=fp8, indices=indices)
                        config = {"heads": heads, "s_q": seq_len_q, "cache": "fp8" if fp8 else "bf16",
                                  "": "sparse" if sparse else "dense", "batch": batch}
                        representative = heads == 128 and seq_len_q == 2 and batch == 64
                        rows_per_head_k = heads if sparse else heads * seq_len_q
                        split, combine = launches
                        cases.append(CompileCase(config, split, async_copy=True, wgmma=rows_per_head_k >= 64,
                                                 representative=representative))
                        cases.append(CompileCase(config, combine, representative=representative))
    return cases
