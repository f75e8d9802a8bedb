"""The specification: what DeepEP's operations compute, in plain single-process
PyTorch loops. Slow and obviously correct; the tests hold every rank's result
against it.

The distributed operations are specified for all ranks at once: lists indexed
by rank hold each rank's inputs and results. Experts are spread evenly, rank r
holding experts ``r * num_local_experts ... (r + 1) * num_local_experts - 1``.
"""

from __future__ import annotations

import torch


def get_dispatch_layout(
    topk_idx: torch.Tensor, num_experts: int, num_ranks: int, num_nodes: int
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """topk_idx: [num_tokens, num_topk] int64, -1 for none ->
    (num_tokens_per_rank [num_ranks] int32, num_tokens_per_rdma_rank [num_nodes] int32 or None when num_nodes == 1,
    num_tokens_per_expert [num_experts] int32, is_token_in_rank [num_tokens, num_ranks] bool)."""
    experts_per_rank, ranks_per_node = num_experts // num_ranks, num_ranks // num_nodes
    num_tokens = topk_idx.shape[0]
    per_expert = [0] * num_experts
    is_token_in_rank = torch.zeros(num_tokens, num_ranks, dtype=torch.bool)
    for token in range(num_tokens):
        for expert in topk_idx[token].tolist():
            if expert >= 0:
                per_expert[expert] += 1
                is_token_in_rank[token, expert // experts_per_rank] = True
    per_rank = [int(is_token_in_rank[:, rank].sum()) for rank in range(num_ranks)]
    per_node = [
        int(is_token_in_rank[:, node * ranks_per_node : (node + 1) * ranks_per_node].any(dim=1).sum()) for node in range(num_nodes)
    ]
    device = topk_idx.device
    return (
        torch.tensor(per_rank, dtype=torch.int32, device=device),
        torch.tensor(per_node, dtype=torch.int32, device=device) if num_nodes > 1 else None,
        torch.tensor(per_expert, dtype=torch.int32, device=device),
        is_token_in_rank.to(device),
    )


def dispatch(xs: list[torch.Tensor], topk_idxs: list[torch.Tensor], topk_weights: list[torch.Tensor], num_experts: int) -> list[dict]:
    """Normal-mode dispatch of every rank's tokens.

    xs[r]: [num_tokens_r, hidden] (any dtype); topk_idxs[r], topk_weights[r]: [num_tokens_r, num_topk].

    Returns, for each rank: ``recv_x`` (the rows it receives: each token once if
    any of its experts lives there, ordered by source rank then source token),
    ``recv_topk_idx`` (local expert ids, -1 for experts elsewhere),
    ``recv_topk_weights`` (0 where the index is -1), ``num_recv_tokens_per_expert``
    (list), ``rank_prefix_matrix`` ([num_ranks, num_ranks] int32: [i][j] tokens
    sent to rank j by ranks 0..i) and ``sources`` (the (rank, token) of each row).
    """
    num_ranks = len(xs)
    local = num_experts // num_ranks
    sent = torch.zeros(num_ranks, num_ranks, dtype=torch.int32)
    results = []
    for dst in range(num_ranks):
        rows, idx_rows, weight_rows, sources = [], [], [], []
        per_expert = [0] * local
        for src in range(num_ranks):
            for token in range(xs[src].shape[0]):
                experts = topk_idxs[src][token].tolist()
                if not any(e >= 0 and e // local == dst for e in experts):
                    continue
                sent[src, dst] += 1
                sources.append((src, token))
                rows.append(xs[src][token])
                ids = [e - dst * local if e >= 0 and e // local == dst else -1 for e in experts]
                for e in ids:
                    if e >= 0:
                        per_expert[e] += 1
                idx_rows.append(torch.tensor(ids, dtype=torch.int64))
                weight_rows.append(torch.where(torch.tensor(ids) >= 0, topk_weights[src][token], 0.0))
        hidden, num_topk = xs[0].shape[1], topk_idxs[0].shape[1]
        results.append(
            {
                "recv_x": torch.stack(rows) if rows else xs[0].new_empty(0, hidden),
                "recv_topk_idx": torch.stack(idx_rows) if rows else torch.empty(0, num_topk, dtype=torch.int64),
                "recv_topk_weights": torch.stack(weight_rows) if rows else torch.empty(0, num_topk),
                "num_recv_tokens_per_expert": per_expert,
                "sources": sources,
            }
        )
    prefix = sent.cumsum(dim=0).to(torch.int32)
    for result in results:
        result["rank_prefix_matrix"] = prefix
    return results


def combine(ys: list[torch.Tensor], sources: list[list[tuple[int, int]]], num_tokens: list[int]) -> list[torch.Tensor]:
    """Normal-mode combine: each source token gets the float32 sum, without
    weights, of the rows every rank sends back for it.

    ys[r]: [num_recv_r, hidden], the rows rank r sends back, one per row it
    received; sources[r]: the (rank, token) of each of those rows (from
    :func:`dispatch`). Returns, for each rank, [num_tokens[r], hidden] float32.
    """
    hidden = ys[0].shape[1]
    combined = [torch.zeros(n, hidden) for n in num_tokens]
    for y, rows in zip(ys, sources):
        for row, (src, token) in enumerate(rows):
            combined[src][token] += y[row].float()
    return combined


def low_latency_dispatch(xs: list[torch.Tensor], topk_idxs: list[torch.Tensor], num_experts: int) -> list[dict]:
    """Low-latency dispatch: every (token, expert) pair lands in that expert's list.

    Returns, for each rank: ``recv_x`` (a list per local expert of the rows it
    receives, ordered by source rank then source token), ``recv_count``
    (list) and ``sources`` (per local expert, the (rank, token) of each row).
    """
    num_ranks = len(xs)
    local = num_experts // num_ranks
    results = []
    for dst in range(num_ranks):
        rows = [[] for _ in range(local)]
        sources = [[] for _ in range(local)]
        for src in range(num_ranks):
            for token in range(xs[src].shape[0]):
                for e in sorted(set(topk_idxs[src][token].tolist())):
                    if e >= 0 and e // local == dst:
                        rows[e - dst * local].append(xs[src][token])
                        sources[e - dst * local].append((src, token))
        results.append(
            {
                "recv_x": [torch.stack(r) if r else xs[0].new_empty(0, xs[0].shape[1]) for r in rows],
                "recv_count": [len(r) for r in rows],
                "sources": sources,
            }
        )
    return results


def low_latency_combine(
    expert_outputs: list[list[torch.Tensor]],
    sources: list[list[list[tuple[int, int]]]],
    topk_idxs: list[torch.Tensor],
    topk_weights: list[torch.Tensor],
    num_experts: int,
) -> list[torch.Tensor]:
    """Low-latency combine: token t of rank r gets ``sum_k w[t, k] * y_{e_k}(t)``
    over its experts e_k (-1 entries skipped), in float32.

    expert_outputs[rank][e]: the rows local expert e of that rank computed, one
    per row it received; sources as :func:`low_latency_dispatch` returns them.
    """
    num_ranks = len(expert_outputs)
    local = num_experts // num_ranks
    hidden = expert_outputs[0][0].shape[1]
    output_of = {}
    for rank in range(num_ranks):
        for e in range(local):
            for row, (src, token) in enumerate(sources[rank][e]):
                output_of[(src, token, rank * local + e)] = expert_outputs[rank][e][row].float()
    combined = []
    for src in range(num_ranks):
        out = torch.zeros(topk_idxs[src].shape[0], hidden)
        for token in range(out.shape[0]):
            for e, w in zip(topk_idxs[src][token].tolist(), topk_weights[src][token].tolist()):
                if e >= 0:
                    out[token] += w * output_of[(src, token, e)]
        combined.append(out)
    return combined
