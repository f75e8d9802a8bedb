"""The GPU path of MLA decoding: split-KV flash decoding in Triton.

Two kernels, following the plan of :func:`dsinfra.flash_mla.get_mla_metadata`:

- ``_split_kernel``: one program per (split, KV head, block of query rows). It
  loads its query rows once (NoPE and RoPE channels), then walks the split's
  tokens in tiles of ``BLOCK_N``, looking each token's slot up in the block table
  (or in ``indices``). Each tile's NoPE channels are loaded once and serve twice,
  as K for the scores (with the RoPE channels) and as V; the loads are
  pipelined (``num_stages``), so on NVIDIA GPUs they become async copies (cp.async)
  into shared memory that the tensor cores read as they land. An online softmax
  (running max, sum and output, float32) gives the split's normalised output and
  log-sum-exp. The FP8 cache is read through a byte pointer (rows of 656 bytes
  are 16-byte aligned, so loads vectorise): each tile's NoPE bytes are decoded to
  fp16 with integer ops (exact, on every target), multiplied by their 128-channel
  group's scale (one scale load per group and token) and rounded to q's dtype,
  as upstream rounds them; the RoPE channels are bfloat16 at byte 528.
- ``_combine_kernel``: one program per (sequence, KV head, block of rows)
  merges the splits of a sequence by their log-sum-exp into the output.

Tile sizes depend on the target (:func:`split_config`): on sm_90, 64 query rows
(64 or 128 heads) run on two warpgroups with wgmma, and the loop keeps its
loop-invariant values (among them the wgmma descriptors of q and of the tile)
inside it: hoisted, Triton 3.9 holds about a hundred descriptors in registers
beside the [64, 512] accumulator and spills. Masked loads read nothing
outside a sequence's tokens, so NaN in unused cache slots never enters. Runs
compiled on a GPU, and on CPU tensors under ``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from dsinfra.flash_mla.fp8_cache import num_scales
from dsinfra.fp8 import GROUP
from dsinfra.triton_utils import (
    E4M3_DECODED_SCALE, INTERPRETING, CompileCase, Target, capturing, decode_e4m3, dot, launch, meta_tensor, target_for,
)


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
def _load_nope(
    cache_ptr, row, token_ok, channel,
    FP8: tl.constexpr, HEAD_DIM_V: tl.constexpr, DV_PAD: tl.constexpr, GROUP_SIZE: tl.constexpr, dtype: tl.constexpr,
):
    """The NoPE channels (K's first HEAD_DIM_V, also V) of the cache rows starting at
    ``row`` ([BLOCK_N] offsets, elements or with FP8 bytes): [BLOCK_N, DV_PAD] in
    ``dtype``, 0 for tokens not ``token_ok`` and channels past HEAD_DIM_V. FP8 rows are
    decoded from their bytes and multiplied by their group's scale (loaded once per
    group and token), rounded to ``dtype`` as upstream's kernel rounds them."""
    if FP8:  # bytes as [BLOCK_N, groups, channels per group], times the group's scale
        WIDTH: tl.constexpr = min(GROUP_SIZE, DV_PAD)
        group = tl.arange(0, DV_PAD // WIDTH)
        grouped = (group[:, None] * WIDTH + tl.arange(0, WIDTH)[None, :])[None, :, :]
        mask = token_ok[:, None, None] & (grouped < HEAD_DIM_V)
        values = tl.load(cache_ptr + row[:, None, None] + grouped, mask=mask, other=0)
        scale_ptr = (cache_ptr + row + HEAD_DIM_V).to(tl.pointer_type(tl.float32))
        scale = tl.load(scale_ptr[:, None] + group[None, :], mask=token_ok[:, None] & (group * WIDTH < HEAD_DIM_V)[None, :], other=0.0)
        values = decode_e4m3(values).to(tl.float32) * (scale * E4M3_DECODED_SCALE)[:, :, None]
        values = _cast(tl.reshape(values, (values.shape[0], DV_PAD)), dtype)
    else:
        mask = token_ok[:, None] & (channel < HEAD_DIM_V)[None, :]
        values = tl.load(cache_ptr + row[:, None] + channel[None, :], mask=mask, other=0.0)
    return values


@triton.jit
def _load_rope(
    cache_ptr, row, token_ok, channel,
    FP8: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, ROPE_OFFSET: tl.constexpr, dtype: tl.constexpr,
):
    """The RoPE channels (K's last HEAD_DIM - HEAD_DIM_V; bfloat16 in the FP8 layout,
    from byte ROPE_OFFSET of a row) as [BLOCK_N, len(channel)] in ``dtype``."""
    mask = token_ok[:, None] & (channel < HEAD_DIM - HEAD_DIM_V)[None, :]
    if FP8:
        rope_ptr = (cache_ptr + row + ROPE_OFFSET).to(tl.pointer_type(tl.bfloat16))
    else:
        rope_ptr = cache_ptr + row + HEAD_DIM_V
    return tl.load(rope_ptr[:, None] + channel[None, :], mask=mask, other=0.0).to(dtype)


@triton.jit
def _split_kernel(
    q_ptr, q_stride_b, q_stride_s, q_stride_h,
    cache_ptr, cache_slot_stride, cache_head_stride,
    block_table_ptr, block_table_stride, cache_seqlens_ptr, indices_ptr, topk,
    plan_ptr, part_out_ptr, part_lse_ptr,
    scale_log2, seq_len_q, heads_per_k, rows_per_head_k, sequences_per_batch,
    PAGE: tl.constexpr, SPARSE: tl.constexpr, CAUSAL: tl.constexpr, FP8: tl.constexpr, GROUP_SIZE: tl.constexpr,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, DV_PAD: tl.constexpr, ROPE_PAD: tl.constexpr,
    ROPE_OFFSET: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, KEEP_INVARIANTS_IN_LOOP: tl.constexpr,
):
    """One split of one sequence for one KV head and BLOCK_M query rows: an online
    softmax over the split's tokens, BLOCK_N at a time. Each tile's NoPE channels
    are loaded once and serve as K (with the RoPE channels) and as V."""
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
        q_row = q_ptr + batch.to(tl.int64) * q_stride_b + position * q_stride_s + head * q_stride_h
        last_visible = length - seq_len_q + position  # causal: the last token each row sees

        channel_v = tl.arange(0, DV_PAD)
        channel_rope = tl.arange(0, ROPE_PAD)
        q_nope = tl.load(q_row[:, None] + channel_v[None, :], mask=row_ok[:, None] & (channel_v < HEAD_DIM_V)[None, :], other=0.0)
        if HEAD_DIM > HEAD_DIM_V:
            q_rope = tl.load(q_row[:, None] + HEAD_DIM_V + channel_rope[None, :],
                             mask=row_ok[:, None] & (channel_rope < HEAD_DIM - HEAD_DIM_V)[None, :], other=0.0)

        row_max = tl.full([BLOCK_M], float("-inf"), tl.float32)
        row_sum = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, DV_PAD], tl.float32)
        cache_head = head_k.to(tl.int64) * cache_head_stride
        for start in tl.range(begin, end, BLOCK_N, disable_licm=KEEP_INVARIANTS_IN_LOOP):
            token = start + tl.arange(0, BLOCK_N)
            token_ok = token < end
            if SPARSE:
                slot = tl.load(indices_ptr + sequence.to(tl.int64) * topk + token, mask=token_ok, other=-1)
                token_ok = token_ok & (slot >= 0)
            else:
                block = tl.load(block_table_ptr + batch.to(tl.int64) * block_table_stride + token // PAGE, mask=token_ok, other=0)
                slot = block * PAGE + token % PAGE
            cache_row = tl.where(token_ok, slot, 0).to(tl.int64) * cache_slot_stride + cache_head

            nope = _load_nope(cache_ptr, cache_row, token_ok, channel_v, FP8, HEAD_DIM_V, DV_PAD, GROUP_SIZE, dtype)
            scores = dot(q_nope, tl.trans(nope), tl.zeros([BLOCK_M, BLOCK_N], tl.float32))
            if HEAD_DIM > HEAD_DIM_V:
                rope = _load_rope(cache_ptr, cache_row, token_ok, channel_rope, FP8, HEAD_DIM, HEAD_DIM_V, ROPE_OFFSET, dtype)
                scores = dot(q_rope, tl.trans(rope), scores)
            visible = token_ok[None, :]
            if CAUSAL:
                visible = visible & (token[None, :] <= last_visible[:, None])
            scores = tl.where(visible, scores * scale_log2, float("-inf"))

            new_max = tl.maximum(row_max, tl.max(scores, 1))
            safe_max = tl.where(new_max == float("-inf"), 0.0, new_max)  # rows that saw nothing yet
            rescale = tl.exp2(row_max - safe_max)
            probs = tl.exp2(scores - safe_max[:, None])
            row_sum = row_sum * rescale + tl.sum(probs, 1)
            acc = dot(_cast(probs, dtype), nope, acc * rescale[:, None])
            row_max = new_max

        seen = row_sum > 0
        row_sum = tl.where(seen, row_sum, 1.0)
        lse = tl.where(seen, (row_max + tl.log2(row_sum)) * 0.6931471805599453, float("-inf"))  # natural log
        out = acc / row_sum[:, None]
        part_row = (split * num_heads_k + head_k).to(tl.int64) * rows_per_head_k + row
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


def split_config(target: Target, rows_per_head_k: int, fp8: bool) -> dict[str, int]:
    """Tile sizes and launch settings of the split kernel for ``target``, chosen by
    compiling for each target and reading registers, spills and shared memory
    (``python -m dsinfra kernels``):

    - sm_90 with 64 or more query rows per KV head: 64 rows on 8 warps (two
      warpgroups; wgmma needs 64 rows), 16 tokens a tile (the [64, 512] float32
      accumulator leaves no registers for more), 2 stages of async copies,
      loop-invariant values kept in the loop (``KEEP_INVARIANTS_IN_LOOP``);
    - other NVIDIA cases: 16 or 32 rows on 4 or 8 warps, 32 tokens a tile (16 when
      FP8 bytes are decoded in registers, 64 values a thread either way), 2 stages;
    - AMD: 16 rows on 4 warps (of 64 lanes), 32 (FP8: 16) tokens.
    """
    if target.wgmma and rows_per_head_k >= 64:
        return {"BLOCK_M": 64, "BLOCK_N": 16, "KEEP_INVARIANTS_IN_LOOP": True, "num_warps": 8, "num_stages": 2}
    block_m = 16 if rows_per_head_k <= 16 or target.backend == "hip" else 32
    block_n = 16 if fp8 and block_m == 16 else 32
    return {"BLOCK_M": block_m, "BLOCK_N": block_n, "KEEP_INVARIANTS_IN_LOOP": False, "num_warps": block_m // 4, "num_stages": 2}


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
    cache = k_cache.view(torch.uint8) if is_fp8_kvcache else k_cache  # FP8 rows are read as bytes
    dummy = torch.empty(1, dtype=torch.int32, device=q.device)

    num_rows = tile_scheduler_metadata.shape[0]
    part_out = torch.empty(num_rows, num_heads_k, rows_per_head_k, head_dim_v, dtype=torch.float32, device=q.device)
    part_lse = torch.empty(num_rows, num_heads_k, rows_per_head_k, dtype=torch.float32, device=q.device)
    out = torch.empty(batch, seq_len_q, num_heads_q, head_dim_v, dtype=q.dtype, device=q.device)
    lse = torch.empty(batch, num_heads_q, seq_len_q, dtype=torch.float32, device=q.device)

    config = split_config(target_for(q.device), rows_per_head_k, is_fp8_kvcache)
    row_blocks = triton.cdiv(rows_per_head_k, config["BLOCK_M"])
    launch(
        _split_kernel, (num_rows, num_heads_k, row_blocks),
        q, q.stride(0), q.stride(1), q.stride(2),
        cache, cache.stride(1), cache.stride(2),
        block_table if not sparse else dummy, block_table.stride(0) if not sparse else 0,
        cache_seqlens if not sparse else dummy, indices if sparse else dummy, indices.shape[2] if sparse else 0,
        tile_scheduler_metadata, part_out, part_lse,
        softmax_scale * math.log2(math.e), seq_len_q, heads_per_k, rows_per_head_k, sequences_per_batch,
        PAGE=page_block_size, SPARSE=sparse, CAUSAL=causal and seq_len_q > 1, FP8=is_fp8_kvcache, GROUP_SIZE=GROUP,
        HEAD_DIM=head_dim, HEAD_DIM_V=head_dim_v, DV_PAD=triton.next_power_of_2(head_dim_v),
        ROPE_PAD=triton.next_power_of_2(max(head_dim - head_dim_v, 1)),
        ROPE_OFFSET=head_dim_v + 4 * num_scales(head_dim_v), **config,
    )
    combine_rows = min(16, triton.next_power_of_2(rows_per_head_k))
    launch(
        _combine_kernel, (sequences, num_heads_k, triton.cdiv(rows_per_head_k, combine_rows)),
        part_out, part_lse, num_splits,
        out, out.stride(0), out.stride(1), out.stride(2), lse, lse.stride(0), lse.stride(1), lse.stride(2),
        heads_per_k, rows_per_head_k, sequences_per_batch,
        HEAD_DIM_V=head_dim_v, DV_PAD=triton.next_power_of_2(head_dim_v), BLOCK_M=combine_rows, num_warps=4,
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
                        representative = heads == 128 and seq_len_q == 2 and fp8 and not sparse and batch == 64
                        rows_per_head_k = heads if sparse else heads * seq_len_q
                        split, combine = launches
                        cases.append(CompileCase(config, split, async_copy=True, wgmma=rows_per_head_k >= 64,
                                                 representative=representative))
                        cases.append(CompileCase(config, combine, representative=representative))
    return cases


from dsinfra.flash_mla.triton_sparse_prefill import flash_mla_sparse_fwd  # noqa: E402,F401  (sparse prefill)
