"""The CPU path of MLA decoding (and sparse prefill): vectorised PyTorch, float32
scores and softmax statistics.

MLA decoding is a few large matmuls once the keys of a sequence are gathered:
all query rows that share a KV head (seq_len_q x 128 heads for DeepSeek-V3)
multiply the same keys. So:

1. Every sequence is cut into pieces of at most ``MAX_WAVE_TOKENS`` keys, and
   pieces of similar lengths are grouped into waves, each padded to its longest
   piece and small enough to work in cache. A "sequence" is a batch entry, or
   for sparse attention a (batch entry, query position) pair.
2. Per wave: the keys of all pieces are gathered at once (one ``index_select``
   of cache rows, :mod:`dsinfra.flash_mla.paged_cache`; padding and -1 slots are
   zeroed, so NaN in unused slots is never multiplied), then one batched matmul
   gives the scores of every query row, masked with -inf where a row must not
   see a key. Max, exp and sum run in float32; one batched matmul multiplies
   the probabilities by V.
3. The pieces of each sequence are merged by their log-sum-exp.

Precision, without touching any process-wide setting: the QKᵀ matmul takes
float32 copies of the keys and queries (exact widenings of bf16/fp16 values),
so its products are exact and its sums float32. The PV matmul multiplies the
float32 probabilities by those float32 keys, unless oneDNN computes q's dtype
natively on this CPU (AVX512-BF16 or AMX for bf16, AVX512-FP16 for fp16): then
the probabilities are rounded to q's dtype, as FlashMLA rounds them, and the PV
matmul runs in q's dtype (exact products, float32 sums), which is faster there.
Without native support a bf16 matmul is a slow scalar loop (a thousand times
slower than float32 on an AVX2 machine).
"""

from __future__ import annotations

import math
import threading

import torch

from dsinfra import backend
from dsinfra.flash_mla.paged_cache import gather_tokens

WAVE_SCORES = 1 << 20  # float32 scores per wave (4 MiB), so that a wave's softmax works in cache
MAX_WAVE_TOKENS = 8192  # keys per wave: bounds the work space (35 MiB for 576-wide heads)
MAX_PADDING = (0.25, 256)  # a piece joins a wave if that pads it by at most 25 % or 256 keys (a wave costs ~0.3 ms)
PREFILL_CHUNK_BYTES = 8 << 20  # float32 keys and scores per step of the sparse prefill


def plan_waves(
    lengths: list[int], wave_tokens: int, granule: int = 1
) -> tuple[list[tuple[int, int, int]], list[int], list[int]]:
    """Cut sequences into pieces of at most ``wave_tokens`` and group them into waves.

    Pieces start at multiples of ``wave_tokens`` and each wave's padded length
    is a multiple of ``granule`` (which divides ``wave_tokens``): a paged cache's
    block size, so that a wave reads whole blocks.
    Returns (waves as (first piece, end piece, padded length), the pieces'
    sequences, the pieces' first tokens), pieces ordered by wave; with a
    single wave of one piece per sequence, in the sequences' order.
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
        padded = -(-pieces[first][0] // granule) * granule
        end = first + 1
        allowed_padding = max(MAX_PADDING[0] * padded, MAX_PADDING[1])
        while end < len(pieces) and (end - first + 1) * padded <= wave_tokens and padded - pieces[end][0] <= allowed_padding:
            end += 1
        waves.append((first, end, padded))
        first = end
    if len(waves) == 1 and len(pieces) == len(lengths):
        pieces.sort(key=lambda piece: piece[1])
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
    num_heads_k = k_cache.shape[2]
    if indices is None:
        sequences, queries_per_sequence = batch, seq_len_q
        lengths = cache_seqlens.tolist()
    else:
        sequences, queries_per_sequence = batch * seq_len_q, 1
        lengths = [indices.shape[2]] * sequences
        indices = indices.contiguous()
    heads_per_k = num_heads_q // num_heads_k
    rows = queries_per_sequence * heads_per_k  # query rows per (sequence, KV head), ordered (query position, head)
    queries = (
        q.reshape(sequences, queries_per_sequence, num_heads_k, heads_per_k, head_dim)
        .transpose(1, 2)
        .reshape(sequences, num_heads_k, rows, head_dim)
        .float()
    )
    pv_dtype = q.dtype if q.device.type != "cpu" or backend.native_cpu_matmul(q.dtype) else torch.float32
    wave_tokens = max(1, min(MAX_WAVE_TOKENS, WAVE_SCORES // (num_heads_k * rows)))
    page_block_size = k_cache.shape[1]
    granule = page_block_size if indices is None and wave_tokens >= page_block_size else 1
    wave_tokens = wave_tokens // granule * granule
    waves, piece_sequence, piece_start = plan_waves(lengths, wave_tokens, granule)
    in_order = piece_sequence == list(range(sequences))  # one piece per sequence, piece i is sequence i
    piece_sequence = torch.tensor(piece_sequence, dtype=torch.long, device=q.device)
    piece_start = torch.tensor(piece_start, dtype=torch.long, device=q.device)
    # Each piece's output over all head_dim channels (the PV matmul reads K whole) and its log-sum-exp.
    piece_out = torch.empty(len(piece_start), num_heads_k, rows, head_dim, dtype=pv_dtype, device=q.device)
    piece_lse = torch.empty(len(piece_start), num_heads_k, rows, dtype=torch.float32, device=q.device)
    largest = max(((end - first) * padded * num_heads_k for first, end, padded in waves), default=0)  # keys per wave
    keys_buffer = workspace("keys", largest * head_dim, q.dtype, q.device)
    keys32_buffer = workspace("keys32", largest * head_dim, torch.float32, q.device)
    scores_buffer = workspace("scores", largest * rows, torch.float32, q.device)
    probs_buffer = workspace("probs", largest * rows, pv_dtype, q.device) if pv_dtype != torch.float32 else None

    for first, end, padded in waves:
        wave, pieces = slice(first, end), (end - first) * num_heads_k
        slot, visible = wave_slots(
            piece_sequence[wave], piece_start[wave], padded, queries_per_sequence,
            block_table, cache_seqlens, page_block_size, granule, causal, indices,
        )
        gathered = gather_tokens(
            k_cache, slot.flatten(), head_dim, head_dim_v, is_fp8_kvcache, q.dtype,
            out=view(keys_buffer, slot.numel(), num_heads_k, head_dim),
        )
        unused = ~visible.any(dim=1).flatten()
        if bool(unused.any()):  # padding and -1 slots: zeros, so 0 * NaN never happens
            gathered.index_fill_(0, unused.nonzero().squeeze(1), 0)
        keys = gathered.view(end - first, padded, num_heads_k, head_dim).transpose(1, 2).reshape(pieces, padded, head_dim)
        keys32 = view(keys32_buffer, pieces, padded, head_dim).copy_(keys)
        wave_queries = (queries[wave] if in_order else queries.index_select(0, piece_sequence[wave])).flatten(0, 1)
        probs = None if probs_buffer is None else view(probs_buffer, pieces, rows, padded)
        attend(
            wave_queries, keys, keys32, visible, softmax_scale, view(scores_buffer, pieces, rows, padded), probs,
            piece_out[wave].flatten(0, 1), piece_lse[wave].flatten(0, 1),
        )

    if in_order:
        out, lse = piece_out[..., :head_dim_v], piece_lse
    elif max(lengths) <= wave_tokens:  # one piece per sequence at most: nothing to merge
        out = piece_out.new_zeros(sequences, num_heads_k, rows, head_dim_v)
        out.index_copy_(0, piece_sequence, piece_out[..., :head_dim_v])
        lse = piece_lse.new_full((sequences, num_heads_k, rows), float("-inf"))
        lse.index_copy_(0, piece_sequence, piece_lse)
    else:
        out, lse = merge_pieces(piece_out[..., :head_dim_v].float(), piece_lse, piece_sequence, sequences)
    lse.masked_fill_(lse == float("-inf"), float("inf"))  # upstream's value for queries that see nothing
    out = out.view(sequences, num_heads_k, queries_per_sequence, heads_per_k, head_dim_v).transpose(1, 2)
    lse = lse.view(sequences, num_heads_k, queries_per_sequence, heads_per_k).transpose(1, 2)
    return (
        out.reshape(batch, seq_len_q, num_heads_q, head_dim_v).to(q.dtype),
        lse.reshape(batch, seq_len_q, num_heads_q).transpose(1, 2).contiguous(),
    )


def wave_slots(
    sequence: torch.Tensor, start: torch.Tensor, padded: int, queries_per_sequence: int,
    block_table: torch.Tensor | None, cache_seqlens: torch.Tensor | None, page_block_size: int, granule: int,
    causal: bool, indices: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The cache slots of a wave's pieces and which query sees which of them.

    sequence, start: [pieces] int64, each piece's sequence and first token;
    granule: page_block_size when starts and ``padded`` are multiples of it
    (whole blocks are read), else 1.
    Returns (slot [pieces, padded] int64, a slot of the cache (0 where the
    sequence has no block); visible [pieces, 1 or queries_per_sequence, padded] bool).
    """
    position = start[:, None] + torch.arange(padded, device=start.device)  # [pieces, padded]
    if indices is not None:
        topk = indices.shape[2]
        slot = indices.view(-1, topk)[sequence[:, None], position.clamp(max=topk - 1)].long()
        valid = (position < topk) & (slot >= 0)
        return torch.where(valid, slot, 0), valid[:, None, :]
    length = cache_seqlens[sequence].long()[:, None]
    valid = position < length
    if granule > 1:  # whole blocks: a block table entry per page_block_size slots
        block_position = position[:, ::granule]
        blocks = block_table[sequence[:, None], (block_position // granule).clamp(max=block_table.shape[1] - 1)]
        first_slots = torch.where(block_position < length, blocks.long() * granule, 0)
        slot = (first_slots[:, :, None] + torch.arange(granule, device=start.device)).view(-1, padded)
    else:
        blocks = block_table[sequence[:, None], torch.where(valid, position // page_block_size, 0)]
        slot = torch.where(valid, blocks.long() * page_block_size + position % page_block_size, 0)
    visible = valid[:, None, :]
    if causal and queries_per_sequence > 1:  # query i sees tokens 0 .. length - queries_per_sequence + i
        last = length - queries_per_sequence + torch.arange(queries_per_sequence, device=start.device)
        visible = visible & (position[:, None, :] <= last[:, :, None])
    return slot, visible


_workspaces = threading.local()


def workspace(name: str, numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A flat buffer of at least ``numel`` elements, kept for the next waves and
    calls on this thread (tens of MiB at most). Large buffers allocated afresh are
    mmap'ed by glibc and page-faulted in on every use: that triples the cost of
    the passes that fill them."""
    buffers = _workspaces.__dict__.setdefault("buffers", {})
    buffer = buffers.get((name, dtype, device))
    if buffer is None or buffer.numel() < numel:
        with torch.inference_mode(False):  # usable in place both in and out of inference mode
            buffer = buffers[name, dtype, device] = torch.empty(numel, dtype=dtype, device=device)
    return buffer


def view(buffer: torch.Tensor, *shape: int) -> torch.Tensor:
    """The first elements of a flat buffer, viewed as ``shape``."""
    return buffer[: math.prod(shape)].view(shape)


def attend(
    queries: torch.Tensor, keys: torch.Tensor, keys32: torch.Tensor, visible: torch.Tensor, softmax_scale: float,
    scores: torch.Tensor, probs: torch.Tensor | None, out: torch.Tensor, lse: torch.Tensor,
) -> None:
    """Attention of each piece's query rows over its keys, V being the keys' first channels.

    queries: [pieces, rows, head_dim] float32, rows ordered (query position, head), pieces
    being count pieces times num_heads_k; keys: [pieces, padded, head_dim] in q's dtype,
    zero where no query sees them, and keys32 the same in float32; visible: [count, 1 or
    queries_per_sequence, padded] bool. scores [pieces, rows, padded] float32 is work space;
    probs [pieces, rows, padded] in q's dtype too, given when the PV matmul runs in q's dtype.
    Writes out [pieces, rows, head_dim] (normalised over the piece) and lse [pieces, rows]
    float32 (-inf for rows that see nothing, NaN for rows with NaN scores).
    """
    # scores * softmax_scale, scaled in float32 by the matmul (beta=0: the input is ignored)
    torch.baddbmm(queries.new_empty(1, 1, 1), queries, keys32.transpose(1, 2), beta=0, alpha=softmax_scale, out=scores)
    if not bool(visible.all()):
        count, queries_per_sequence, padded = visible.shape
        scores.view(count, -1, queries_per_sequence, scores.shape[1] // queries_per_sequence, padded).masked_fill_(
            ~visible[:, None, :, None, :], float("-inf")
        )
    row_max = scores.amax(dim=-1, keepdim=True)
    row_max.masked_fill_(row_max == float("-inf"), 0.0)  # rows that see nothing: exp(-inf - 0) = 0
    weights = scores.sub_(row_max).exp_()
    row_sum = weights.sum(dim=-1)
    weights.div_(row_sum.clamp(min=torch.finfo(torch.float32).tiny)[..., None])
    if probs is None:
        torch.bmm(weights, keys32, out=out)
    else:
        torch.bmm(probs.copy_(weights), keys, out=out)  # all head_dim channels: keys stays one contiguous operand
    torch.add(row_max.squeeze(-1), row_sum.log(), out=lse)


def merge_pieces(
    piece_out: torch.Tensor, piece_lse: torch.Tensor, piece_sequence: torch.Tensor, sequences: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge the pieces of each sequence by their log-sum-exp.

    piece_out: [pieces, ..., head_dim_v] float32, each normalised over its own keys;
    piece_lse: [pieces, ...] float32 (-inf for a piece a row saw nothing of);
    piece_sequence: [pieces] int64. Returns (out [sequences, ..., head_dim_v],
    lse [sequences, ...]) float32, with out = 0 and lse = -inf where a row saw nothing.
    """
    shape = (sequences, *piece_lse.shape[1:])
    index = piece_sequence.view(-1, *[1] * (piece_lse.dim() - 1)).expand_as(piece_lse)
    lse_max = torch.full(shape, float("-inf"), dtype=torch.float32, device=piece_lse.device)
    lse_max.scatter_reduce_(0, index, piece_lse, "amax")
    lse_max.masked_fill_(lse_max == float("-inf"), 0.0)
    weight = torch.exp(piece_lse - lse_max[piece_sequence])
    total = torch.zeros(shape, dtype=torch.float32, device=piece_lse.device).index_add_(0, piece_sequence, weight)
    out = torch.zeros(*shape, piece_out.shape[-1], dtype=torch.float32, device=piece_out.device)
    out.index_add_(0, piece_sequence, piece_out * weight[..., None])
    out.div_(total.clamp(min=torch.finfo(torch.float32).tiny)[..., None])
    return out, lse_max + total.log()


def flash_mla_sparse_fwd(
    q: torch.Tensor,
    kv: torch.Tensor,
    indices: torch.Tensor,
    sm_scale: float,
    d_v: int,
    attn_sink: torch.Tensor | None = None,
    topk_length: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Arguments as :func:`dsinfra.flash_mla.flash_mla_sparse_fwd`, already checked.

    Per KV head, queries in chunks whose float32 keys and scores take about
    ``PREFILL_CHUNK_BYTES``: one ``index_select`` gathers each query's top-k rows
    (rows of ignored positions are zeroed: they may hold NaN), one batched
    matmul gives the scores, the softmax runs in float32, one batched matmul
    multiplies by V, all in float32.
    """
    s_q, h_q, d_qk = q.shape
    s_kv, h_kv, _ = kv.shape
    topk = indices.shape[-1]
    heads = h_q // h_kv
    out = torch.empty(s_q, h_q, d_v, dtype=q.dtype, device=q.device)
    max_logits = torch.empty(s_q, h_q, dtype=torch.float32, device=q.device)
    lse = torch.empty(s_q, h_q, dtype=torch.float32, device=q.device)
    positions = torch.arange(topk, device=q.device)
    chunk = max(1, PREFILL_CHUNK_BYTES // (4 * topk * (d_qk + heads)))
    for group in range(h_kv):
        head = slice(group * heads, (group + 1) * heads)
        for start in range(0, s_q, chunk):
            rows = slice(start, min(start + chunk, s_q))
            selected = indices[rows, group].long()  # [c, topk]
            valid = (selected >= 0) & (selected < s_kv)
            if topk_length is not None:
                valid &= positions < topk_length[rows, None]
            keys = kv[:, group].index_select(0, torch.where(valid, selected, 0).flatten())
            keys = keys.view(*selected.shape, d_qk).float().masked_fill_(~valid[..., None], 0.0)
            scores = torch.bmm(q[rows, head].float(), keys.transpose(1, 2)).mul_(sm_scale)  # [c, heads, topk]
            scores.masked_fill_(~valid[:, None, :], float("-inf"))
            row_max = scores.amax(dim=-1)
            shift = row_max.masked_fill(row_max == float("-inf"), 0.0)  # rows that see nothing: exp(-inf - 0) = 0
            weights = scores.sub_(shift[..., None]).exp_()
            row_sum = weights.sum(dim=-1)
            weights.div_(row_sum.clamp(min=torch.finfo(torch.float32).tiny)[..., None])
            part_out = torch.bmm(weights, keys[..., :d_v])
            part_lse = shift + row_sum.log()  # -inf where a row sees nothing
            sees_nothing = part_lse == float("-inf")
            if attn_sink is not None:
                kept = torch.sigmoid(part_lse - attn_sink[head]).masked_fill_(sees_nothing, 1.0)
                part_out.mul_(kept[..., None])
            out[rows, head] = part_out
            max_logits[rows, head] = row_max
            lse[rows, head] = part_lse.masked_fill_(sees_nothing, float("inf"))
    return out, max_logits, lse
