"""The CPU path of MLA decoding: vectorised PyTorch, bf16 matmuls with float32
softmax statistics.

MLA decoding is a few large matmuls once the keys of a sequence are gathered:
all query rows that share a KV head (seq_len_q x 128 heads for DeepSeek-V3)
multiply the same keys. So:

1. Every sequence is cut into pieces of at most ``MAX_WAVE_TOKENS`` keys, and
   pieces of similar lengths are grouped into waves, each padded to its longest
   piece and small enough to work in cache. A "sequence" is a batch entry, or
   for sparse attention a (batch entry, query position) pair.
2. Per wave: the keys of all pieces are gathered at once (``index_select`` of
   slots; padding and -1 slots are zeroed, so NaN in unused slots is never
   multiplied), then one batched matmul gives the scores of every query row,
   masked with -inf where a row must not see a key. Max, exp and sum run in
   float32; one batched matmul multiplies the probabilities by V.
3. The pieces of each sequence are merged by their log-sum-exp.

With few query rows per KV head (at most ``FUSED_MAX_ROWS``: 16 or 32 heads,
as tensor parallelism leaves them), step 2's attention goes instead to
PyTorch's fused CPU flash attention (``aten::_scaled_dot_product_flash_attention_for_cpu``:
AMX matmuls with float32 scores, probabilities rounded to bf16), which is then
1.5-2x faster; with 64 rows and more the batched matmuls below are as fast or
faster (``docs/flash_mla.md``).

Precision: the QKᵀ matmul takes float32 copies of the bf16 keys and queries
(exact) and runs in oneDNN's bf16 mode (``torch.backends.mkldnn.matmul.
fp32_precision = "bf16"``, set for the call only): bf16 products on AMX, float32
accumulation, float32 scores. A bf16 matmul would round the scores to bf16,
which moves peaked softmaxes by ~1e-4 in cos-diff and the lse by ~1e-2. The
normalised probabilities are rounded to bf16 for the PV matmul, as FlashMLA
rounds them, and its bf16 output is the result. fp16 inputs get exact float32
scores instead (the bf16 mode would round fp16 values).
"""

from __future__ import annotations

import contextlib
import math
import threading
from collections.abc import Iterator

import torch

from dsinfra.flash_mla.fp8_cache import dequantize_k_cache

WAVE_SCORES = 1 << 20  # float32 scores per wave (4 MiB), so that a wave's softmax works in cache
MAX_WAVE_TOKENS = 8192  # keys per wave: bounds the work space (35 MiB for 576-wide heads)
FUSED_MAX_ROWS = 32  # query rows per KV head up to which PyTorch's fused CPU attention serves a wave
MAX_PADDING = (0.25, 256)  # a piece joins a wave if that pads it by at most 25 % or 256 keys (a wave costs ~0.3 ms)


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
        allowed_padding = max(MAX_PADDING[0] * padded, MAX_PADDING[1])
        while end < len(pieces) and (end - first + 1) * padded <= wave_tokens and padded - pieces[end][0] <= allowed_padding:
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
    num_heads_k, entry = k_cache.shape[2], k_cache.shape[3]
    if indices is None:
        sequences, queries_per_sequence = batch, seq_len_q
        lengths = cache_seqlens.tolist()
    else:
        sequences, queries_per_sequence = batch * seq_len_q, 1
        lengths = [indices.shape[2]] * sequences
    heads_per_k = num_heads_q // num_heads_k
    rows = queries_per_sequence * heads_per_k  # query rows per (sequence, KV head), ordered (query position, head)
    queries = (
        q.reshape(sequences, queries_per_sequence, num_heads_k, heads_per_k, head_dim)
        .transpose(1, 2)
        .reshape(sequences, num_heads_k, rows, head_dim)
    )
    fused = rows <= FUSED_MAX_ROWS and q.device.type == "cpu"
    if not fused:
        queries = queries.float()
    slots = k_cache.view(-1, num_heads_k * entry)  # one row per cache slot
    wave_tokens = max(1, min(MAX_WAVE_TOKENS, WAVE_SCORES // (num_heads_k * rows)))
    waves, piece_sequence, piece_start = plan_waves(lengths, wave_tokens)
    piece_sequence = torch.tensor(piece_sequence, dtype=torch.long, device=q.device)
    piece_start = torch.tensor(piece_start, dtype=torch.long, device=q.device)
    # Each piece's output over all head_dim channels (the PV matmul reads K whole) and its log-sum-exp.
    piece_out = torch.empty(len(piece_start), num_heads_k, rows, head_dim, dtype=q.dtype, device=q.device)
    piece_lse = torch.empty(len(piece_start), num_heads_k, rows, dtype=torch.float32, device=q.device)
    largest = max(((end - first) * padded * num_heads_k for first, end, padded in waves), default=0)  # keys per wave
    gather_buffer = workspace("gather", largest * entry, k_cache.dtype, q.device)
    if not fused:
        keys32_buffer = workspace("keys32", largest * head_dim, torch.float32, q.device)
        scores_buffer = workspace("scores", largest * rows, torch.float32, q.device)
        probs_buffer = workspace("probs", largest * rows, q.dtype, q.device)

    with matmul_precision(q.dtype):
        for first, end, padded in waves:
            wave, pieces = slice(first, end), (end - first) * num_heads_k
            slot, visible = wave_slots(
                piece_sequence[wave], piece_start[wave], padded, queries_per_sequence,
                block_table, cache_seqlens, k_cache.shape[1], causal, indices,
            )
            gathered = torch.index_select(slots, 0, slot.flatten(), out=view(gather_buffer, slot.numel(), num_heads_k * entry))
            gathered = gathered.view(-1, num_heads_k, entry)
            if is_fp8_kvcache:
                gathered = dequantize_k_cache(gathered, head_dim, head_dim_v, q.dtype)
            unused = ~visible.any(dim=1).flatten()
            if bool(unused.any()):  # padding and -1 slots: zeros, so 0 * NaN never happens
                gathered.index_fill_(0, unused.nonzero().squeeze(1), 0)
            keys = gathered.view(end - first, padded, num_heads_k, head_dim).transpose(1, 2).reshape(pieces, padded, head_dim)
            wave_queries = queries.index_select(0, piece_sequence[wave]).flatten(0, 1)
            out, lse = piece_out[wave].flatten(0, 1), piece_lse[wave].flatten(0, 1)
            if fused:
                attend_fused(wave_queries, keys, visible, softmax_scale, out, lse)
            else:
                attend(
                    wave_queries, keys, visible, softmax_scale, view(keys32_buffer, pieces, padded, head_dim),
                    view(scores_buffer, pieces, rows, padded), view(probs_buffer, pieces, rows, padded), out, lse,
                )

    if max(lengths) <= wave_tokens:  # one piece per sequence at most: nothing to merge
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
    block_table: torch.Tensor | None, cache_seqlens: torch.Tensor | None, page_block_size: int,
    causal: bool, indices: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The cache slots of a wave's pieces and which query sees which of them.

    sequence, start: [pieces] int64, each piece's sequence and first token.
    Returns (slot [pieces, padded] int64, 0 where there is no token;
    visible [pieces, 1 or queries_per_sequence, padded] bool).
    """
    position = start[:, None] + torch.arange(padded, device=start.device)  # [pieces, padded]
    if indices is not None:
        topk = indices.shape[2]
        slot = indices.view(-1, topk)[sequence[:, None], position.clamp(max=topk - 1)].long()
        valid = (position < topk) & (slot >= 0)
        return torch.where(valid, slot, 0), valid[:, None, :]
    length = cache_seqlens[sequence].long()[:, None]
    valid = position < length
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


def attend_fused(
    queries: torch.Tensor, keys: torch.Tensor, visible: torch.Tensor, softmax_scale: float,
    out: torch.Tensor, lse: torch.Tensor,
) -> None:
    """:func:`attend` through PyTorch's fused CPU flash attention, for few rows per KV head.

    queries: [pieces, rows, head_dim] in q's dtype; the other arguments as :func:`attend`.
    The kernel takes V as wide as K, so V is the keys whole and its last channels
    are dropped later, as :func:`attend` does. A row that sees nothing gets lse
    -inf and zeros (the kernel would give lse 0).
    """
    count, queries_per_sequence, padded = visible.shape
    pieces, rows, _ = queries.shape
    layout = (count, pieces // count, queries_per_sequence, rows // queries_per_sequence)  # rows as (query position, head)
    mask = None
    if not bool(visible.all()):
        hidden = torch.zeros(visible.shape, dtype=queries.dtype, device=queries.device).masked_fill_(~visible, float("-inf"))
        mask = hidden[:, None, :, None, :].expand(*layout, padded).reshape(pieces, 1, rows, padded)
    keys = keys[:, None]
    result, row_lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        queries[:, None], keys, keys, 0.0, False, attn_mask=mask, scale=softmax_scale
    )
    out.copy_(result[:, 0])
    lse.copy_(row_lse[:, 0])
    if mask is not None:
        sees_nothing = ~visible.any(dim=-1)  # [count, queries_per_sequence]
        if bool(sees_nothing.any()):
            sees_nothing = sees_nothing[:, None, :, None].expand(layout).reshape(pieces, rows)
            lse.masked_fill_(sees_nothing, float("-inf"))
            out.masked_fill_(sees_nothing[..., None], 0)


def attend(
    queries: torch.Tensor, keys: torch.Tensor, visible: torch.Tensor, softmax_scale: float,
    keys32: torch.Tensor, scores: torch.Tensor, probs: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
) -> None:
    """Attention of each piece's query rows over its keys, V being the keys' first channels.

    queries: [pieces, rows, head_dim] float32, rows ordered (query position, head), pieces
    being count pieces times num_heads_k; keys: [pieces, padded, head_dim] in q's dtype,
    zero where no query sees them; visible: [count, 1 or queries_per_sequence, padded] bool.
    keys32 [pieces, padded, head_dim] float32, scores [pieces, rows, padded] float32 and
    probs [pieces, rows, padded] in q's dtype are work space.
    Writes out [pieces, rows, head_dim] in keys' dtype (normalised over the piece) and
    lse [pieces, rows] float32 (-inf for rows that see nothing).
    """
    keys32.copy_(keys)
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
    lse_max = torch.full(shape, float("-inf"), device=piece_lse.device).scatter_reduce_(0, index, piece_lse, "amax")
    lse_max.masked_fill_(lse_max == float("-inf"), 0.0)
    weight = torch.exp(piece_lse - lse_max[piece_sequence])
    total = torch.zeros(shape, device=piece_lse.device).index_add_(0, piece_sequence, weight)
    out = torch.zeros(*shape, piece_out.shape[-1], device=piece_out.device)
    out.index_add_(0, piece_sequence, piece_out * weight[..., None])
    out.div_(total.clamp(min=torch.finfo(torch.float32).tiny)[..., None])
    return out, lse_max + total.log()
