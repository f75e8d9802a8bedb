"""What every rank learns before tokens move, and the checks it makes with it.

A normal-mode dispatch starts with one all-gather of a few integers per rank,
of a size fixed by the group (so it can never mismatch, whatever a rank
passed): its call's signature (hidden size, dtype, top-k, number of experts),
whether its arguments passed its own checks, and its token counts per
destination rank and node. From that table every split size and every rank's
buffer needs follow, so all ranks take the same decisions and raise the same
errors without further talk: a rank with bad arguments, ranks that disagree
on shapes, or a buffer too small make every rank raise at once instead of
leaving peers waiting in a collective (or gloo aborting on mismatched sizes).
Only once the ranks agree on the number of experts does a second all-gather
bring the per-expert counts.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist


@dataclasses.dataclass(frozen=True)
class Counts:
    """The all-gathered table, as host integers indexed ``[source rank][...]``."""

    signature: list[dict[str, int]]
    has_problem: list[bool]
    tokens_to_rank: list[list[int]]  # [i][j]: tokens rank i sends to rank j
    tokens_to_node: list[list[int]]  # [i][n]: tokens rank i sends to node n
    extra: list[list[int]]  # [i][...]: per-rank values that need no agreement (e.g. num_worst_tokens)


def exchange_counts(
    group: dist.ProcessGroup,
    device: torch.device,
    signature: dict[str, int],
    problem: Exception | None,
    tokens_to_rank: torch.Tensor | None,
    tokens_to_node: torch.Tensor | None,
    extra: list[int],
    num_nodes: int,
) -> Counts:
    """All-gather this rank's signature, problem flag, counts and ``extra``:
    one collective of a fixed size (the same on every rank whatever its
    arguments), one host synchronisation. A rank with a problem sends zeros
    for its counts (``None``)."""
    num_ranks = group.size()
    head = torch.tensor([*signature.values(), problem is not None, *extra], dtype=torch.int64, device=device)
    if problem is not None or tokens_to_rank is None:
        counts = torch.zeros(num_ranks + num_nodes, dtype=torch.int64, device=device)
    else:
        counts = torch.cat([tokens_to_rank.long(), tokens_to_node.long()]).to(device)
    vector = torch.cat([head, counts])
    gathered = [torch.empty_like(vector) for _ in range(num_ranks)]
    dist.all_gather(gathered, vector, group=group)
    table = torch.stack(gathered).tolist()
    names = list(signature)
    cuts = [len(names) + 1, len(head), len(head) + num_ranks]
    return Counts(
        signature=[dict(zip(names, row)) for row in table],
        has_problem=[bool(row[len(names)]) for row in table],
        extra=[row[cuts[0] : cuts[1]] for row in table],
        tokens_to_rank=[row[cuts[1] : cuts[2]] for row in table],
        tokens_to_node=[row[cuts[2] :] for row in table],
    )


def exchange_expert_counts(group: dist.ProcessGroup, tokens_to_expert: torch.Tensor) -> list[list[int]]:
    """All-gather each rank's ``[num_experts]`` counts; ``[i][e]``: rank i's
    (token, top-k) entries routed to expert e. Call it only once the ranks
    agree on ``num_experts`` (its length)."""
    vector = tokens_to_expert.long()
    gathered = [torch.empty_like(vector) for _ in range(group.size())]
    dist.all_gather(gathered, vector, group=group)
    return torch.stack(gathered).tolist()


def raise_problems(operation: str, problem: Exception | None, has_problem: list[bool]) -> None:
    """Raise this rank's own problem, or name the ranks that had one."""
    if problem is not None:
        raise problem
    ranks = [rank for rank, flag in enumerate(has_problem) if flag]
    if ranks:
        raise RuntimeError(f"{operation}: rank {', '.join(map(str, ranks))} rejected its arguments (see its error); every rank stops")


def check_agreement(operation: str, signatures: list[dict[str, int]], describe=None) -> None:
    """Raise ValueError when the ranks' signatures differ; ``describe(name, value)``
    renders a value for the message."""
    for name in signatures[0]:
        values = [signature[name] for signature in signatures]
        if len(set(values)) > 1:
            shown = ", ".join(f"rank {r}: {describe(name, v) if describe else v}" for r, v in enumerate(values))
            raise ValueError(f"{operation}: the ranks disagree on {name} ({shown}); every rank must call it alike")


def check_capacity(operation: str, needed: list[int], limits: list[int], buffer_argument: str, where: str) -> None:
    """Raise ValueError when some rank r would receive ``needed[r]`` bytes,
    more than its buffer's ``limits[r]`` (the same verdict on every rank)."""
    for rank, (need, limit) in enumerate(zip(needed, limits)):
        if need > limit:
            raise ValueError(
                f"{operation}: rank {rank} would receive {need} bytes {where} in one call, more than its "
                f"{buffer_argument} ({limit}); create the Buffer with {buffer_argument} >= {need}"
            )
