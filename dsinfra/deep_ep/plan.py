"""What every rank learns before tokens move, and the checks it makes with it.

A normal-mode dispatch starts with one all-gather of a few integers per rank:
its call's signature (hidden size, dtype, ...), whether its arguments passed
its own checks, and its token counts per destination rank, node and expert.
From that table every split size and every rank's buffer needs follow, so
all ranks take the same decisions and raise the same errors without further
talk: a rank with bad arguments, ranks that disagree on shapes, or a buffer
too small make every rank raise at once instead of leaving peers waiting in
a collective.
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
    tokens_to_expert: list[list[int]]  # [i][e]: (token, top-k) entries of rank i routed to expert e


def exchange_counts(
    group: dist.ProcessGroup,
    signature: dict[str, int],
    problem: str | None,
    tokens_to_rank: torch.Tensor,
    tokens_to_node: torch.Tensor,
    tokens_to_expert: torch.Tensor,
) -> Counts:
    """All-gather this rank's signature, problem flag and counts (1-D integer
    tensors on the transfer device); one collective, one host synchronisation."""
    head = torch.tensor([*signature.values(), problem is not None], dtype=torch.int64, device=tokens_to_rank.device)
    vector = torch.cat([head, tokens_to_rank.long(), tokens_to_node.long(), tokens_to_expert.long()])
    gathered = [torch.empty_like(vector) for _ in range(group.size())]
    dist.all_gather(gathered, vector, group=group)
    table = torch.stack(gathered).tolist()
    names = list(signature)
    cuts = [len(head), len(head) + len(tokens_to_rank), len(head) + len(tokens_to_rank) + len(tokens_to_node)]
    return Counts(
        signature=[dict(zip(names, row)) for row in table],
        has_problem=[bool(row[len(names)]) for row in table],
        tokens_to_rank=[row[cuts[0] : cuts[1]] for row in table],
        tokens_to_node=[row[cuts[1] : cuts[2]] for row in table],
        tokens_to_expert=[row[cuts[2] :] for row in table],
    )


def raise_problems(operation: str, problem: str | None, has_problem: list[bool]) -> None:
    """Raise this rank's own problem, or name the ranks that had one."""
    if problem is not None:
        raise ValueError(problem)
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
