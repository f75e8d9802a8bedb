"""The GPU path of sparse prefill (:func:`dsinfra.flash_mla.flash_mla_sparse_fwd`) in Triton.

One program per (query, KV head, block of that KV head's query heads). It walks
the query's top-k index positions in tiles of ``BLOCK_N`` (up to
``topk_length``), loads each position's kv row (positions whose index lies
outside ``[0, s_kv)`` are masked, so their rows are never read), builds the
scores of its heads as a sum of ``BLOCK_D``-wide dots over the head dim, and
keeps an online softmax in float32: running max (the ``max_logits`` it
returns), sum and output. The probabilities are rounded to kv's dtype for the
PV dot, as FlashMLA rounds them. At the end the attention sink, if any, scales
the output by ``exp(lse) / (exp(lse) + exp(sink))``.

Runs compiled on a GPU, and on CPU tensors under ``TRITON_INTERPRET=1``. There,
float32 -> bf16 casts truncate instead of rounding, so the probabilities stay
float32 and the output is written in float32 and rounded by PyTorch.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dsinfra.triton_utils import INTERPRETING, CompileCase, Target, capturing, dot, launch, meta_tensor

BLOCK_N = 32  # index positions per tile
BLOCK_D = 64  # head-dim channels per partial dot: 576 = 9 x 64


@triton.jit
def _sparse_prefill_kernel(
    q_ptr, q_stride_s, q_stride_h,
    kv_ptr, kv_stride_s, kv_stride_h,
    indices_ptr, indices_stride_s, indices_stride_h,
    topk_length_ptr, sink_ptr,
    out_ptr, max_logits_ptr, lse_ptr,
    sm_scale, s_kv, topk, heads_per_kv,
    HAVE_LENGTH: tl.constexpr, HAVE_SINK: tl.constexpr,
    D_QK: tl.constexpr, D_V: tl.constexpr, DV_PAD: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    query = tl.program_id(0).to(tl.int64)
    group = tl.program_id(1)
    local = tl.program_id(2) * BLOCK_H + tl.arange(0, BLOCK_H)
    row_ok = local < heads_per_kv
    head = group * heads_per_kv + local
    h_q = tl.num_programs(1) * heads_per_kv
    q_row = q_ptr + query * q_stride_s + head * q_stride_h
    length = topk
    if HAVE_LENGTH:
        length = tl.minimum(tl.load(topk_length_ptr + query), topk)

    row_max = tl.full([BLOCK_H], float("-inf"), tl.float32)
    row_sum = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, DV_PAD], tl.float32)
    channel_v = tl.arange(0, DV_PAD)
    for start in range(0, length, BLOCK_N):
        position = start + tl.arange(0, BLOCK_N)
        index = tl.load(indices_ptr + query * indices_stride_s + group * indices_stride_h + position,
                        mask=position < length, other=-1)
        ok = (position < length) & (index >= 0) & (index < s_kv)
        k_row = kv_ptr + tl.where(ok, index, 0).to(tl.int64) * kv_stride_s + group * kv_stride_h

        scores = tl.zeros([BLOCK_H, BLOCK_N], tl.float32)
        for first_channel in tl.static_range(0, D_QK, BLOCK_D):
            channel = first_channel + tl.arange(0, BLOCK_D)
            q_chunk = tl.load(q_row[:, None] + channel[None, :], mask=row_ok[:, None] & (channel < D_QK)[None, :], other=0.0)
            k_chunk = tl.load(k_row[:, None] + channel[None, :], mask=ok[:, None] & (channel < D_QK)[None, :], other=0.0)
            scores = dot(q_chunk, tl.trans(k_chunk), scores)
        scores = tl.where(ok[None, :], scores * sm_scale, float("-inf"))

        new_max = tl.maximum(row_max, tl.max(scores, 1))
        shift = tl.where(new_max == float("-inf"), 0.0, new_max)  # rows that saw nothing yet
        rescale = tl.exp(row_max - shift)
        probs = tl.exp(scores - shift[:, None])
        row_sum = row_sum * rescale + tl.sum(probs, 1)
        values = tl.load(k_row[:, None] + channel_v[None, :], mask=ok[:, None] & (channel_v < D_V)[None, :], other=0.0)
        if INTERPRETING:
            acc = dot(probs, values.to(tl.float32), acc * rescale[:, None])
        else:
            acc = dot(probs.to(values.dtype), values, acc * rescale[:, None])
        row_max = new_max

    seen = row_sum > 0
    lse = tl.where(seen, row_max + tl.log(tl.where(seen, row_sum, 1.0)), float("inf"))
    out = acc / tl.where(seen, row_sum, 1.0)[:, None]
    if HAVE_SINK:
        sink = tl.load(sink_ptr + head, mask=row_ok, other=float("-inf"))
        kept = 1.0 / (1.0 + tl.exp(sink - tl.where(seen, lse, 0.0)))  # exp(lse) / (exp(lse) + exp(sink))
        out = out * tl.where(seen, kept, 1.0)[:, None]
    result_row = query * h_q + head
    tl.store(out_ptr + result_row[:, None] * D_V + channel_v[None, :], out.to(out_ptr.dtype.element_ty),
             mask=row_ok[:, None] & (channel_v < D_V)[None, :])
    tl.store(max_logits_ptr + result_row, row_max, mask=row_ok)
    tl.store(lse_ptr + result_row, lse, mask=row_ok)


def flash_mla_sparse_fwd(
    q: torch.Tensor,
    kv: torch.Tensor,
    indices: torch.Tensor,
    sm_scale: float,
    d_v: int,
    attn_sink: torch.Tensor | None = None,
    topk_length: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Arguments as :func:`dsinfra.flash_mla.flash_mla_sparse_fwd`, already checked."""
    q, kv, indices = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, kv, indices))
    s_q, h_q, d_qk = q.shape
    s_kv, h_kv, _ = kv.shape
    heads_per_kv = h_q // h_kv
    dv_pad = triton.next_power_of_2(d_v)
    block_h = min(32 if dv_pad >= 512 else 64, max(16, triton.next_power_of_2(heads_per_kv)))
    out = torch.empty(s_q, h_q, d_v, dtype=torch.float32 if INTERPRETING else q.dtype, device=q.device)
    max_logits = torch.empty(s_q, h_q, dtype=torch.float32, device=q.device)
    lse = torch.empty(s_q, h_q, dtype=torch.float32, device=q.device)
    dummy = torch.empty(1, dtype=torch.float32, device=q.device)
    launch(
        _sparse_prefill_kernel, (s_q, h_kv, triton.cdiv(heads_per_kv, block_h)),
        q, q.stride(0), q.stride(1),
        kv, kv.stride(0), kv.stride(1),
        indices, indices.stride(0), indices.stride(1),
        topk_length if topk_length is not None else dummy, attn_sink if attn_sink is not None else dummy,
        out, max_logits, lse,
        sm_scale, s_kv, indices.shape[2], heads_per_kv,
        HAVE_LENGTH=topk_length is not None, HAVE_SINK=attn_sink is not None,
        D_QK=d_qk, D_V=d_v, DV_PAD=dv_pad, BLOCK_H=block_h, BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D,
        num_warps=8, num_stages=1 if dv_pad >= 512 else 2,
    )
    return out.to(q.dtype), max_logits, lse


# DeepSeek-V3.2's sparse prefill shapes for the `kernels` report: 128 (and, under
# tensor parallelism, 64 and 16) query heads over one KV head of 576 / 512, top-2048.
REPORT_HEADS = (16, 64, 128)
REPORT_QUERIES, REPORT_KEYS, REPORT_TOPK = 4096, 8192, 2048


def compile_cases(target: Target) -> list[CompileCase]:
    """The kernel as a V3.2 prefill launches it for ``target``, with and without
    ``topk_length`` and the attention sink."""
    cases = []
    for heads in REPORT_HEADS:
        for extras in (False, True):
            q = meta_tensor(REPORT_QUERIES, heads, 576, dtype=torch.bfloat16)
            kv = meta_tensor(REPORT_KEYS, 1, 576, dtype=torch.bfloat16)
            indices = meta_tensor(REPORT_QUERIES, 1, REPORT_TOPK, dtype=torch.int32)
            sink = meta_tensor(heads, dtype=torch.float32) if extras else None
            lengths = meta_tensor(REPORT_QUERIES, dtype=torch.int32) if extras else None
            with capturing(target) as launches:
                flash_mla_sparse_fwd(q, kv, indices, 576**-0.5, 512, attn_sink=sink, topk_length=lengths)
            config = {"heads": heads, "s_q": REPORT_QUERIES, "": "sink+topk_length" if extras else "plain"}
            cases.append(CompileCase(config, launches[0], representative=heads == 128 and not extras))
    return cases
