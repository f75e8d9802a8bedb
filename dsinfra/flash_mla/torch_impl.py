"""The CPU path of MLA decoding: vectorised PyTorch, bf16 matmuls with float32
softmax statistics.

MLA decoding is a few large matmuls once the keys of a sequence are gathered:
all query rows that share a KV head (seq_len_q x 128 heads for DeepSeek-V3)
multiply the same keys. So:

1. Every sequence is cut into pieces of at most ``wave_tokens`` keys; pieces of
   similar lengths are grouped into waves, each padded to its longest piece and
   small enough that its float32 scores stay in cache. A "sequence" is a batch
   entry, or for sparse attention a (batch entry, query position) pair.
2. Per wave: the keys of all pieces are gathered at once (``index_select`` of
   slots; padding and -1 slots are zeroed, so NaN in unused slots is never
   multiplied), then one batched matmul gives the scores of every query row,
   masked with -inf where a row must not see a key. Max, exp and sum run in
   float32; one batched matmul multiplies the probabilities by V.
3. The pieces of each sequence are merged by their log-sum-exp.

Precision: bf16 keys and queries are exact in float32, and the matmuls run in
oneDNN's bf16 mode (``torch.backends.mkldnn.matmul.fp32_precision = "bf16"``):
bf16 products on AMX, float32 accumulation and float32 scores. (A bf16 matmul
would round the scores to bf16, which moves peaked softmaxes by ~1e-4 in
cos-diff.) The probabilities are rounded to bf16 inside the PV matmul, as
FlashMLA rounds them. fp16 inputs run exact float32 matmuls instead, since the
bf16 mode would round fp16 values.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from dsinfra.flash_mla.fp8_cache import dequantize_k_cache

WAVE_SCORES = 1 << 20  # float32 scores per wave (4 MiB): the softmax of a wave works in cache
MAX_WAVE_TOKENS = 16384  # keys per wave, whatever the number of query rows
MIN_FILL = 0.75  # a piece joins a wave only if it fills this much of the wave's padded length


@contextlib.contextmanager
def matmul_precision(dtype: torch.dtype) -> Iterator[None]:
    """float32 matmuls on bf16-exact inputs run as bf16 x bf16 -> fp32 on oneDNN
    (AMX) for bf16 data, and exactly for fp16 data; restored afterwards."""
    settings = getattr(getattr(torch.backends, "mkldnn", None), "matmul", None)
    if settings is None or not hasattr(settings, "fp32_precision"):  # PyTorch before 2.9: plain float32
        yield
        return
    previous = settings.fp32_precision
    settings.fp32_precision = "bf16" if dtype == torch.bfloat16 else "ieee"
    try:
        yield
    finally:
        settings.fp32_precision = previous


def plan_waves(lengths: list[int], wave_tokens: int) -> tuple[list[tuple[int, int, int]], list[int], list[int]]:
    """Cut sequences into pieces of at most ``wave_tokens`` and group them into waves.

    Returns (waves as (first piece, end piece, padded length), the pieces'
    sequences, the pieces' first tokens), pieces ordered by wave.
    """
    pieces = sorted(
        ((min(wave_tokens, length - start), sequence, start)
         for sequence, length in enumerate(lengths)
         for start in range(0, length, wave_tokens)),
        reverse=True,
    )
    waves = []
    first = 0
    while first < len(pieces):
        padded = pieces[first][0]
        end = first + 1
        while end < len(pieces) and (end - first + 1) * padded <= wave_tokens and pieces[end][0] >= MIN_FILL * padded:
            end += 1
        waves.append((first, end, padded))
        first = end
    return waves, [piece[1] for piece in pieces], [piece[2] for piece in pieces]


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
    checked, with ``softmax_scale`` a float. The split plan is not needed here."""
    batch, seq_len_q, num_heads_q, head_dim = q.shape
    _, page_block_size, num_heads_k, entry = k_cache.shape
    device = q.device
    if indices is None:
        sequences, queries_per_sequence = batch, seq_len_q
        lengths = cache_seqlens.tolist()
        seqlens = cache_seqlens.long()
    else:
        sequences, queries_per_sequence = batch * seq_len_q, 1
        topk = indices.shape[2]
        lengths = [topk] * sequences
        slot_lists = indices.view(sequences, topk)
    heads_per_k = num_heads_q // num_heads_k
    rows = queries_per_sequence * heads_per_k  # query rows per (sequence, KV head)
    # [sequences, num_heads_k, rows, head_dim], rows ordered (query position, head)
    queries = (
        q.reshape(sequences, queries_per_sequence, num_heads_k, heads_per_k, head_dim)
        .transpose(1, 2)
        .reshape(sequences, num_heads_k, rows, head_dim)
        .float()
    )
    slots = k_cache.view(-1, num_heads_k * entry)  # one row per cache slot
    wave_tokens = max(1, min(MAX_WAVE_TOKENS, WAVE_SCORES // (num_heads_k * rows)))
    waves, piece_sequence, piece_start = plan_waves(lengths, wave_tokens)
    piece_sequence = torch.tensor(piece_sequence, dtype=torch.long, device=device)
    piece_start = torch.tensor(piece_start, dtype=torch.long, device=device)
    piece_out = torch.empty(len(piece_start), num_heads_k, rows, head_dim, dtype=torch.float32, device=device)
    piece_lse = torch.empty(len(piece_start), num_heads_k, rows, dtype=torch.float32, device=device)
    query_position = torch.arange(queries_per_sequence, device=device)

    with matmul_precision(q.dtype):
        for first, end, padded in waves:
            wave = slice(first, end)
            count = end - first
            sequence = piece_sequence[wave]
            position = piece_start[wave, None] + torch.arange(padded, device=device)  # [count, padded]
            if indices is None:
                length = seqlens[sequence, None]
                valid = position < length
                blocks = block_table[sequence[:, None], torch.where(valid, position // page_block_size, 0)]
                slot = blocks.long() * page_block_size + position % page_block_size
                visible = valid[:, None, :]  # [count, 1 or queries_per_sequence, padded]
                if causal and queries_per_sequence > 1:
                    visible = visible & (position[:, None, :] <= (length - queries_per_sequence + query_position)[:, :, None])
            else:
                in_range = position < topk
                slot = slot_lists[sequence[:, None], position.clamp(max=topk - 1)].long()
                valid = in_range & (slot >= 0)
                visible = valid[:, None, :]
            slot = torch.where(valid, slot, 0)

            gathered = slots.index_select(0, slot.flatten()).view(count * padded, num_heads_k, entry)
            if is_fp8_kvcache:
                gathered = dequantize_k_cache(gathered, head_dim, head_dim_v, q.dtype)
            if not bool(valid.all()):
                gathered.index_fill_(0, (~valid).flatten().nonzero().squeeze(1), 0)
            # [count * num_heads_k, padded, head_dim] in float32, exact
            keys = torch.empty(count, num_heads_k, padded, head_dim, dtype=torch.float32, device=device)
            keys.copy_(gathered.view(count, padded, num_heads_k, head_dim).transpose(1, 2))
            keys = keys.view(count * num_heads_k, padded, head_dim)

            scores = torch.bmm(queries.index_select(0, sequence).view(count * num_heads_k, rows, head_dim), keys.transpose(1, 2))
            if not bool(visible.all()):
                scores.view(count, num_heads_k, queries_per_sequence, heads_per_k, padded).masked_fill_(
                    ~visible[:, None, :, None, :], float("-inf")
                )
            row_max = scores.amax(dim=-1, keepdim=True)
            row_max.masked_fill_(row_max == float("-inf"), 0.0)  # rows that see nothing: exp(-inf - 0) = 0
            probs = scores.sub_(row_max).mul_(softmax_scale).exp_()
            row_sum = probs.sum(dim=-1)
            out = piece_out[wave].view(count * num_heads_k, rows, head_dim)
            torch.bmm(probs, keys, out=out)  # all head_dim columns: keys stays one contiguous operand
            out.div_(row_sum.clamp(min=torch.finfo(torch.float32).tiny)[..., None])
            piece_lse[wave] = (row_max.squeeze(-1) * softmax_scale + row_sum.log()).view(count, num_heads_k, rows)

    out, lse = merge_pieces(piece_out[..., :head_dim_v], piece_lse, piece_sequence, sequences)
    out = out.view(sequences, num_heads_k, queries_per_sequence, heads_per_k, head_dim_v).transpose(1, 2)
    lse = lse.view(sequences, num_heads_k, queries_per_sequence, heads_per_k).transpose(1, 2)
    return (
        out.reshape(batch, seq_len_q, num_heads_q, head_dim_v).to(q.dtype),
        lse.reshape(batch, seq_len_q, num_heads_q).transpose(1, 2).contiguous(),
    )


def merge_pieces(
    piece_out: torch.Tensor, piece_lse: torch.Tensor, piece_sequence: torch.Tensor, sequences: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge the pieces of each sequence by their log-sum-exp.

    piece_out: [pieces, ..., head_dim_v] float32, each normalised over its own keys;
    piece_lse: [pieces, ...] float32 (-inf for a piece a row saw nothing of);
    piece_sequence: [pieces] int64. Returns (out [sequences, ..., head_dim_v],
    lse [sequences, ...]), with out = 0 and lse = +inf where a row saw nothing.
    """
    shape = (sequences, *piece_lse.shape[1:])
    index = piece_sequence.view(-1, *[1] * (piece_lse.dim() - 1)).expand_as(piece_lse)
    lse_max = torch.full(shape, float("-inf"), device=piece_lse.device).scatter_reduce_(0, index, piece_lse, "amax")
    lse_max.masked_fill_(lse_max == float("-inf"), 0.0)
    weight = torch.exp(piece_lse - lse_max[piece_sequence])
    total = torch.zeros(shape, device=piece_lse.device).index_add_(0, piece_sequence, weight)
    out = torch.zeros(*shape, piece_out.shape[-1], device=piece_out.device)
    out.index_add_(0, piece_sequence, piece_out * weight[..., None])
    out.div_(total.clamp(min=torch.finfo(torch.float32).tiny)[..., None])
    lse = (lse_max + total.log()).masked_fill_(total == 0, float("inf"))
    return out, lse
