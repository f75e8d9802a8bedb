"""Low-latency dispatch and combine, for decoding: static shapes, no host
synchronisation, so a GPU can capture them in a CUDA graph.

Every rank provides ``num_max_dispatch_tokens_per_rank`` rows, its tokens
first and padding after, each row its token (cast to FP8 on the way, or
bf16) and its ``[num_experts]`` expert mask. With shapes fixed in advance a
rank cannot size per-destination messages, so every rank receives every
rank's rows (one all-gather, the same bytes as a padded all-to-all) and keeps
those that chose its experts: for each local expert, a stable sort of its
mask puts the chosen rows first, ordered by source rank, then source token.
The receive layout is upstream's: ``[num_local_experts,
num_max_dispatch_tokens_per_rank * num_ranks, hidden]``, valid up to
``recv_count[e]``, FP8 scales column-major in the last two dimensions.

Combine reduces with the weights. Each rank first sends every expert's rank
the weights of its tokens for that rank's experts (``[max_tokens,
num_local_experts]`` floats per destination), so the expert's rank can sum,
per source token, its experts' outputs times their weights; then one bf16 row
per token and rank goes back (an all-to-all of equal shares) and the source
adds the ranks' rows in float32. A token that lists an expert twice is sent
to it once, its weights added.

Static shapes make the work proportional to the capacity
(``num_max_dispatch_tokens_per_rank * num_ranks`` slots per expert), not to
the tokens that arrived. That is the price on a GPU; on the CPU, where reading
the counts costs nothing, the unpacking and the reduction touch only the
filled slots (:func:`static_shapes`).
"""

from __future__ import annotations

import torch

from dsinfra.deep_ep.comm import Comm
from dsinfra.deep_ep.handles import LowLatencyHandle
from dsinfra.deep_ep.normal import Transfer
from dsinfra.deep_ep.rows import RowFormat
from dsinfra.fp8 import GROUP, per_token_cast_to_fp8


def size_hint(num_max_dispatch_tokens_per_rank: int, hidden: int, num_ranks: int, num_experts: int) -> int:
    """The most bytes a rank receives in one low-latency dispatch or combine (bf16 sizing)."""
    rows = num_ranks * num_max_dispatch_tokens_per_rank
    scales = -(-hidden // GROUP) * 4
    dispatch = rows * (2 * hidden + scales + num_experts)
    combine = rows * (2 * hidden + 4 * (num_experts // num_ranks))
    return -(-max(dispatch, combine) // 128) * 128


def static_shapes(device: torch.device) -> bool:
    """Whether low-latency work must avoid host synchronisation (so a GPU can
    capture it in a CUDA graph); on the CPU it may read the counts."""
    return device.type != "cpu"


def _padded(t: torch.Tensor, num_rows: int) -> torch.Tensor:
    """``t`` with zero rows appended up to ``num_rows``."""
    out = torch.zeros((num_rows, *t.shape[1:]), dtype=t.dtype, device=t.device)
    out[: t.shape[0]] = t
    return out


def cast_to_fp8(x: torch.Tensor, round_scale: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token FP8 (1x128 float32 scales); with ``round_scale`` each scale is
    rounded up to a power of two (exactly representable as UE8M0) and the
    values are cast with it."""
    x_fp8, scales = per_token_cast_to_fp8(x)
    if not round_scale:
        return x_fp8, scales
    scales = torch.exp2(torch.ceil(torch.log2(scales)))
    groups = x.float().unflatten(-1, (-1, GROUP)) / scales[..., None]
    return groups.flatten(-2).to(torch.float8_e4m3fn), scales


def pack_ue8m0(scales: torch.Tensor) -> torch.Tensor:
    """float32 powers of two ``[..., groups]`` (groups a multiple of 4) ->
    their exponent bytes (UE8M0), four to an int32: ``[..., groups / 4]``,
    group 4i + b in byte b (upstream's packing)."""
    exponents = (scales.contiguous().view(torch.int32) >> 23).to(torch.uint8)
    return exponents.view(torch.int32)


def dispatch(
    comm: Comm,
    x: torch.Tensor,
    topk_idx: torch.Tensor,
    max_tokens: int,
    num_experts: int,
    use_fp8: bool,
    round_scale: bool = False,
    use_ue8m0: bool = False,
    recv_stats: torch.Tensor | None = None,
) -> tuple[torch.Tensor | tuple[torch.Tensor, torch.Tensor], torch.Tensor, LowLatencyHandle, list, callable]:
    """Start a low-latency dispatch; returns (recv_x, recv_count, handle, works,
    finish): the outputs are complete once the works are waited for and
    ``finish()`` has run. ``round_scale`` / ``use_ue8m0``: power-of-two scales,
    delivered as float32 or packed UE8M0 (int32, four scales each);
    ``recv_stats`` (int32 [num_local_experts]) gets each expert's count added."""
    num_ranks, me = comm.topology.num_ranks, comm.topology.rank
    num_local, slots = num_experts // num_ranks, num_ranks * max_tokens
    num_tokens, hidden = x.shape
    device = x.device
    chosen = torch.zeros(max_tokens, num_experts + 1, dtype=torch.bool, device=device)
    chosen[:num_tokens].scatter_(1, topk_idx.masked_fill(topk_idx < 0, num_experts), True)
    token_fields = list(cast_to_fp8(x, round_scale)) if use_fp8 else [x]
    fields = [_padded(f, max_tokens) for f in token_fields] + [chosen[:, :num_experts]]
    fmt = RowFormat(fields)
    arrived = torch.empty(num_ranks, max_tokens, fmt.row_bytes, dtype=torch.uint8, device=device)
    work = comm.all_gather(arrived, fmt.pack(fields), async_op=True)

    recv_x = torch.empty(num_local, slots, hidden, dtype=token_fields[0].dtype, device=device)
    recv_scales = None
    if use_fp8:  # column-major in the last two dimensions, as upstream (TMA-friendly)
        scale_columns, scale_dtype = (hidden // (4 * GROUP), torch.int32) if use_ue8m0 else (hidden // GROUP, torch.float32)
        recv_scales = torch.empty(num_local, scale_columns, slots, dtype=scale_dtype, device=device).transpose(1, 2)
    recv_count = torch.empty(num_local, dtype=torch.int32, device=device)
    handle = LowLatencyHandle(
        src_info=torch.empty(num_local, slots, dtype=torch.int32, device=device),
        layout_range=torch.empty(num_local, num_ranks, dtype=torch.int64, device=device),
        num_max_dispatch_tokens_per_rank=max_tokens,
        hidden=hidden,
        num_experts=num_experts,
    )
    handle.slot_rows = torch.empty(num_local, slots, dtype=torch.int64, device=device)

    def finish() -> None:
        rows = arrived.view(slots, fmt.row_bytes)
        mask_start = fmt.offsets[-1] + me * num_local
        selected = (rows[:, mask_start : mask_start + num_local] != 0).t()  # [num_local, slots]
        order = torch.argsort((~selected).to(torch.uint8), dim=1, stable=True)
        count = selected.sum(dim=1)
        valid = torch.arange(slots, device=device)[None, :] < count[:, None]
        recv_count.copy_(count)
        if recv_stats is not None:
            recv_stats.add_(recv_count)
        handle.slot_rows.copy_(torch.where(valid, order, slots))
        handle.src_info.copy_(torch.where(valid, order % max_tokens, -1))
        per_rank = selected.view(num_local, num_ranks, max_tokens).sum(dim=2)
        handle.layout_range.copy_(((per_rank.cumsum(dim=1) - per_rank) << 32) | per_rank)
        scales = [torch.empty(num_local * slots, hidden // GROUP, dtype=torch.float32, device=device)] if use_fp8 else []
        outputs = [recv_x.view(-1, hidden)] + scales
        data, index = rows[:, : fmt.offsets[-1]], order.flatten()
        if static_shapes(device):  # every slot, past the counts too
            RowFormat(outputs).unpack_into(data, outputs, index=index)
        else:
            filled = valid.flatten().nonzero().squeeze(1)
            RowFormat(outputs).unpack_into(data, outputs, index=index[filled], positions=filled)
        if use_fp8:
            received = pack_ue8m0(outputs[1]) if use_ue8m0 else outputs[1]
            recv_scales.copy_(received.view(num_local, slots, -1))

    recv = (recv_x, recv_scales) if use_fp8 else recv_x
    return recv, recv_count, handle, [work], finish


def combine(
    comm: Comm, x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor, handle: LowLatencyHandle
) -> Transfer:
    """Send the weights (completed here), reduce this rank's experts' outputs
    per source token, and start sending the sums back; see the module doc.
    A dispatch not yet waited for is completed first: its handle needs it."""
    if handle.arrival is not None:
        handle.arrival.current_stream_wait()
    num_ranks = comm.topology.num_ranks
    max_tokens, num_experts = handle.num_max_dispatch_tokens_per_rank, handle.num_experts
    num_local, slots = num_experts // num_ranks, num_ranks * max_tokens
    num_tokens, hidden = topk_idx.shape[0], x.shape[2]
    device = x.device
    weights = torch.zeros(max_tokens, num_experts + 1, dtype=torch.float32, device=device)
    weights[:num_tokens].scatter_add_(1, topk_idx.masked_fill(topk_idx < 0, num_experts), topk_weights)
    send_weights = weights[:, :num_experts].reshape(max_tokens, num_ranks, num_local).transpose(0, 1).reshape(slots, num_local)
    weights_here = torch.empty_like(send_weights)
    comm.all_to_all(weights_here, send_weights)

    # Slots past an expert's count point at the extra last row, which is dropped:
    # whatever they hold (NaN included) never reaches a result.
    sums = torch.zeros(slots + 1, hidden, dtype=torch.float32, device=device)
    if static_shapes(device):  # every slot, expert by expert: within one expert the rows are distinct
        for expert in range(num_local):
            rows = handle.slot_rows[expert]
            weight = weights_here[rows.clamp(max=slots - 1), expert]
            sums.index_add_(0, rows, x[expert].float() * weight[:, None])
    else:  # the filled slots only (the CPU adds them in order)
        experts, filled = (handle.slot_rows < slots).nonzero(as_tuple=True)
        rows = handle.slot_rows[experts, filled]
        sums.index_add_(0, rows, x[experts, filled].float() * weights_here[rows, experts][:, None])
    back = torch.empty(slots, hidden, dtype=x.dtype, device=device)
    work = comm.all_to_all(back, sums[:slots].to(x.dtype), async_op=True)
    combined = torch.empty(num_tokens, hidden, dtype=x.dtype, device=device)

    def finish() -> None:
        combined.copy_(back.view(num_ranks, max_tokens, hidden).float().sum(dim=0)[:num_tokens])

    return [combined], [work], finish
