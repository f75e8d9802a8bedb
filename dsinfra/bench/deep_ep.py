"""DeepEP dispatch + combine on 4 ranks against a naive per-expert all-to-all: time and bytes sent.

The ranks are spawned processes talking over gloo (NCCL with ``--device
cuda``, one GPU per rank, up to 4). Every case times the same tokens both
ways in the same ranks; a timed call is the slowest rank's time for that
iteration (ranks meet at a barrier before each).

- ``normal``: layout + dispatch (with top-k) + combine, bf16 and FP8
  (combine in bf16, as upstream), top-8 of 64 experts. The baseline sends
  each token once per expert it chose (``naive per-expert all-to-all``).
  Bytes: payload a rank sends to other ranks, against the minimum (one copy
  per token per destination rank) and against the naive scheme.
- ``hierarchical``: the same as "2 nodes x 2 ranks", against one flat node:
  the bytes that cross between nodes.
- ``low-latency``: FP8 low-latency dispatch + combine of a decoding batch,
  against the normal mode on the same tokens.
- ``oversubscribed`` (CPU): normal bf16 dispatch + combine of 1,024 tokens of
  hidden 1,024 against the naive all-to-all, run twice: with one thread per
  rank, and with every rank at torch's default thread count (as
  ``torch.multiprocessing.spawn`` leaves them), so the 4 ranks ask for more
  threads than the machine has cores.
"""

from __future__ import annotations

import time

import torch
import torch.distributed as dist

NUM_EXPERTS, NUM_TOPK = 64, 8


def _sizes(quick: bool) -> dict:
    if quick:
        return {"num_tokens": 64, "hidden": 1024, "decode_tokens": 16, "oversubscribed_tokens": 256}
    return {"num_tokens": 512, "hidden": 7168, "decode_tokens": 128, "oversubscribed_tokens": 1024}


def _timed(fn, group, device, warmup: int, repeats: int) -> list[float]:
    """Per-iteration seconds of ``fn()``: the slowest rank's, after a barrier."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        dist.barrier(group=group)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        samples.append(time.perf_counter() - start)
    samples = torch.tensor(samples, dtype=torch.float64, device=device)
    dist.all_reduce(samples, op=dist.ReduceOp.MAX, group=group)
    return samples.tolist()


class NaiveAllToAll:
    """The baseline: every (token, expert) pair travels as its own row (the
    token and its expert id), grouped by destination rank; the way back sums
    the rows of each token. Counts bytes sent to other ranks like a Buffer."""

    def __init__(self, group, topk_idx: torch.Tensor, num_experts: int):
        self.group, self.rank, num_ranks = group, group.rank(), group.size()
        valid = topk_idx >= 0
        experts = topk_idx[valid]
        order = torch.argsort(experts, stable=True)
        self.tokens = valid.nonzero()[:, 0][order]  # the token of each pair, by expert
        self.experts = experts[order]
        send = torch.bincount(self.experts // (num_experts // num_ranks), minlength=num_ranks)
        recv = torch.empty_like(send)
        dist.all_to_all_single(recv, send, group=group)
        self.send, self.recv = send.tolist(), recv.tolist()
        self.sent_bytes = 0

    def _rows_to_others(self, counts: list[int], row_bytes: int) -> None:
        self.sent_bytes += sum(c for r, c in enumerate(counts) if r != self.rank) * row_bytes

    def dispatch(self, x: torch.Tensor) -> torch.Tensor:
        """Rows [pairs, ...] of ``x`` (as bytes, so FP8 travels too) with their expert ids."""
        rows = torch.cat([x.view(torch.uint8)[self.tokens], self.experts.view(torch.uint8).view(-1, 8)], dim=1)
        out = torch.empty(sum(self.recv), rows.shape[1], dtype=torch.uint8, device=x.device)
        self._rows_to_others(self.send, rows.shape[1])
        dist.all_to_all_single(out, rows, self.recv, self.send, group=self.group)
        return out

    def combine(self, y: torch.Tensor, num_tokens: int) -> torch.Tensor:
        """Send each pair's row of ``y`` back and sum per token."""
        back = torch.empty(sum(self.send), y.shape[1], dtype=y.dtype, device=y.device)
        self._rows_to_others(self.recv, y.shape[1] * y.element_size())
        dist.all_to_all_single(back, y, self.send, self.recv, group=self.group)
        out = torch.zeros(num_tokens, y.shape[1], dtype=torch.float32, device=y.device)
        return out.index_add_(0, self.tokens, back.float()).to(y.dtype)


def _normal_case(buffer, group, x, topk_idx, topk_weights, device, settings, *, naive: bool = False) -> dict:
    """Our layout + dispatch + combine (and with ``naive`` the naive per-expert
    all-to-all) on the same tokens: per-iteration times, and the bytes one call sends."""
    hidden = (x[0] if isinstance(x, tuple) else x).shape[1]

    def ours(y=None):
        layout = buffer.get_dispatch_layout(topk_idx, NUM_EXPERTS)
        recv_x, _, _, _, handle, _ = buffer.dispatch(
            x,
            topk_idx=topk_idx,
            topk_weights=topk_weights,
            num_tokens_per_rank=layout[0],
            num_tokens_per_rdma_rank=layout[1],
            num_tokens_per_expert=layout[2],
            is_token_in_rank=layout[3],
        )
        rows = (recv_x[0] if isinstance(recv_x, tuple) else recv_x).shape[0]
        buffer.combine(y if y is not None else torch.zeros(rows, hidden, dtype=torch.bfloat16, device=device), handle)
        return rows

    num_recv = ours()  # the expert outputs to send back: one bf16 row per received row
    expert_output = torch.randn(num_recv, hidden, dtype=torch.float32, device=device).to(torch.bfloat16)
    buffer.traffic.reset()
    ours(expert_output)
    case = {"sent": buffer.traffic.intranode_bytes + buffer.traffic.internode_bytes, "internode": buffer.traffic.internode_bytes}
    case["time"] = _timed(lambda: ours(expert_output), group, device, settings["warmup"], settings["repeats"])
    if naive:
        naive_output = torch.randn(sum(NaiveAllToAll(group, topk_idx, NUM_EXPERTS).recv), hidden, dtype=torch.float32, device=device).to(torch.bfloat16)

        def baseline() -> int:
            scheme = NaiveAllToAll(group, topk_idx, NUM_EXPERTS)  # routing and counts, as ours does per call
            scheme.dispatch(x[0] if isinstance(x, tuple) else x)
            scheme.combine(naive_output, topk_idx.shape[0])
            return scheme.sent_bytes

        case["naive_sent"] = baseline()
        case["baseline"] = _timed(baseline, group, device, settings["warmup"], settings["repeats"])
    return case


def _minimum_bytes(is_token_in_rank: torch.Tensor, rank: int, dispatch_row: int, combine_row: int) -> int:
    """One copy per token per destination rank other than itself, there and back."""
    copies = int(is_token_in_rank.sum()) - int(is_token_in_rank[:, rank].sum())
    return copies * (dispatch_row + combine_row)


def _oversubscribed_rank(rank, world_size, group, settings):
    """The normal bf16 case at the oversubscription setting (hidden 1,024)."""
    from dsinfra.deep_ep import Buffer
    from dsinfra.testing import randn, topk_indices

    device, num_tokens = torch.device("cpu"), settings["oversubscribed_tokens"]
    x = randn(num_tokens, 1024, seed=rank, dtype=torch.bfloat16)
    topk_idx = topk_indices(num_tokens, NUM_EXPERTS, NUM_TOPK, seed=100 + rank)
    topk_weights = torch.rand(num_tokens, NUM_TOPK, dtype=torch.float32)
    buffer = Buffer(group, num_nvl_bytes=int(2e9))
    return _normal_case(buffer, group, x, topk_idx, topk_weights, device, settings, naive=True)


def _run_rank(rank, world_size, group, settings):
    from dsinfra.deep_ep import Buffer
    from dsinfra.fp8 import per_token_cast_to_fp8
    from dsinfra.testing import randn, topk_indices

    device = torch.device("cuda", torch.cuda.current_device()) if settings["device"] == "cuda" else torch.device("cpu")
    num_tokens, hidden = settings["num_tokens"], settings["hidden"]
    x = randn(num_tokens, hidden, seed=rank, dtype=torch.bfloat16, device=device)
    topk_idx = topk_indices(num_tokens, NUM_EXPERTS, NUM_TOPK, seed=100 + rank, device=device)
    topk_weights = torch.rand(num_tokens, NUM_TOPK, dtype=torch.float32, device=device)
    buffer = Buffer(group, num_nvl_bytes=int(2e9), num_rdma_bytes=int(2e9), low_latency_mode=True)
    in_rank = buffer.get_dispatch_layout(topk_idx, NUM_EXPERTS)[3]
    results = {}
    for name, tokens, dispatch_row in (
        ("bf16", x, 2 * hidden),
        ("fp8", per_token_cast_to_fp8(x), hidden + 4 * (hidden // 128)),
    ):
        case = _normal_case(buffer, group, tokens, topk_idx, topk_weights, device, settings, naive=True)
        case["minimum"] = _minimum_bytes(in_rank, rank, dispatch_row + 12 * NUM_TOPK, 2 * hidden)
        results[f"normal {name}"] = case

    if world_size == 4:
        two_nodes = Buffer(group, num_nvl_bytes=int(2e9), num_rdma_bytes=int(2e9), num_ranks_per_node=2)
        case = _normal_case(two_nodes, group, x, topk_idx, topk_weights, device, settings)
        flat = Buffer(group, num_nvl_bytes=int(2e9), num_ranks_per_node=4)
        flat_case = _normal_case(flat, group, x, topk_idx, topk_weights, device, settings)
        # the flat scheme would send every copy for a rank of the other node across
        other_node = in_rank.view(num_tokens, 2, 2)[:, 1 - rank // 2]
        flat_internode = int(other_node.sum()) * (2 * hidden + 12 * NUM_TOPK + 2 * hidden)
        results["hierarchical bf16, 2 nodes x 2"] = dict(case, baseline=flat_case["time"], flat_internode=flat_internode)

    decode_tokens = settings["decode_tokens"]
    x_decode, idx_decode, weights_decode = x[:decode_tokens], topk_idx[:decode_tokens], topk_weights[:decode_tokens]
    recv, _, handle, _, _ = buffer.low_latency_dispatch(x_decode, idx_decode, decode_tokens, NUM_EXPERTS)
    expert_output = torch.randn(recv[0].shape, dtype=torch.float32, device=device).to(torch.bfloat16)

    def low_latency():
        _, _, handle, _, _ = buffer.low_latency_dispatch(x_decode, idx_decode, decode_tokens, NUM_EXPERTS)
        buffer.low_latency_combine(expert_output, idx_decode, weights_decode, handle)

    buffer.traffic.reset()
    low_latency()
    sent = buffer.traffic.intranode_bytes
    normal = _normal_case(buffer, group, per_token_cast_to_fp8(x_decode), idx_decode, weights_decode, device, settings)
    results["low-latency fp8"] = {
        "time": _timed(low_latency, group, device, settings["warmup"], settings["repeats"]),
        "baseline": normal["time"],
        "sent": sent,
        "normal_sent": normal["sent"],
    }
    return results


def benchmark(ctx) -> None:
    from dsinfra.testing import spawn

    gpu = ctx.device.type == "cuda"
    num_ranks = min(4, torch.cuda.device_count()) if gpu else 4
    if gpu and num_ranks < 2:
        ctx.log("deep_ep: NCCL needs one GPU per rank and this machine has one; running a single rank (no transfers)")
    settings = dict(_sizes(ctx.quick), warmup=ctx.warmup, repeats=ctx.repeats, device=ctx.device.type)
    ranks = spawn(_run_rank, num_ranks, settings, backend="nccl" if gpu else "gloo", timeout=1800, threads_per_rank=1)
    params = {"ranks": num_ranks, "experts": NUM_EXPERTS, "topk": NUM_TOPK, "hidden": settings["hidden"]}

    def median(samples):
        return float(torch.tensor(samples).median())

    def mean_over_ranks(key, case):
        return sum(r[case][key] for r in ranks) / num_ranks

    def ratio(a, b):  # None where nothing was sent (a single rank keeps everything)
        return a / b if b else None

    for case in ranks[0]:
        first = ranks[0][case]  # times are already the slowest rank's
        extra = {"sent MB/rank": mean_over_ranks("sent", case) / 1e6}
        if case.startswith("normal"):
            sent, minimum, naive = (mean_over_ranks(k, case) for k in ("sent", "minimum", "naive_sent"))
            extra.update({"sent/minimum": ratio(sent, minimum), "naive/sent": ratio(naive, sent)})
            baseline, tokens = "naive per-expert all-to-all", settings["num_tokens"]
        elif case.startswith("hierarchical"):
            internode, flat = mean_over_ranks("internode", case), mean_over_ranks("flat_internode", case)
            extra.update({"internode MB/rank": internode / 1e6, "flat internode/internode": ratio(flat, internode)})
            baseline, tokens = "flat (one node)", settings["num_tokens"]
        else:
            extra["normal sent/sent"] = ratio(mean_over_ranks("normal_sent", case), mean_over_ranks("sent", case))
            baseline, tokens = "normal mode, same tokens", settings["decode_tokens"]
        ctx.record(
            f"{case}, {tokens} tokens/rank",
            time_s=median(first["time"]),
            min_time_s=min(first["time"]),
            baseline=baseline,
            baseline_time_s=median(first["baseline"]),
            bytes=mean_over_ranks("sent", case),
            params=dict(params, tokens_per_rank=tokens),
            extra=extra,
        )
    if not gpu:
        _oversubscription(ctx, settings, num_ranks, params)


def _oversubscription(ctx, settings, num_ranks: int, params: dict) -> None:
    """The normal bf16 case with 1 thread per rank, then with torch's default
    (the cores of the machine) in every rank."""
    import os

    from dsinfra.testing import spawn

    tokens = settings["oversubscribed_tokens"]
    for threads in (1, os.cpu_count() or 1):
        first = spawn(_oversubscribed_rank, num_ranks, settings, timeout=1800, threads_per_rank=threads)[0]
        state = f"{num_ranks} ranks x {threads} threads on {os.cpu_count()} cores"
        ctx.record(
            f"oversubscription: normal bf16, {tokens} tokens/rank, hidden 1024, {state}",
            time_s=float(torch.tensor(first["time"]).median()),
            min_time_s=min(first["time"]),
            baseline="naive per-expert all-to-all",
            baseline_time_s=float(torch.tensor(first["baseline"]).median()),
            bytes=first["sent"],
            params=dict(params, hidden=1024, tokens_per_rank=tokens, threads_per_rank=threads),
        )
