"""The argument checks of the Buffer's calls, and how their verdicts reach
every rank.

A rank whose arguments are wrong must not leave its peers waiting in a
collective, nor make gloo abort them by joining one with other sizes. So a
call runs its checks first, catching what they raise, and then, before any
collective whose sizes depend on the arguments, the ranks all-gather a row of
a size fixed by the group: whether the rank's checks passed, and the sizes
that shape the collective. Every rank then raises: the rank with the problem
its own error, the others a RuntimeError naming it; ranks that disagree on a
size all raise the same ValueError. Where checks may not synchronise (a GPU
without ``DSINFRA_CHECKS=1``) a call that needs no count exchange skips the
row and raises only on the rank that erred.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from dsinfra import backend
from dsinfra.deep_ep.plan import check_agreement, raise_problems
from dsinfra.fp8 import GROUP
from dsinfra.validation import check_divisible, check_range, check_tensor

HIDDEN_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
DTYPE_CODES = {dtype: code for code, dtype in enumerate((*HIDDEN_DTYPES, torch.float8_e4m3fn))}
_DTYPE_NAMES = {code: str(dtype).replace("torch.", "") for dtype, code in DTYPE_CODES.items()}
# The largest byte count a Buffer accepts (what fits in an int64).
MAX_BYTES = 2**63 - 1


def describe(name: str, value: int) -> object:
    """A size as an error message shows it (dtype codes by name)."""
    return _DTYPE_NAMES.get(value, value) if name.endswith("dtype") else value


def exchange_verdicts(
    operation: str, group: dist.ProcessGroup, device: torch.device, problem: Exception | None, sizes: dict[str, int]
) -> list[dict[str, int]]:
    """All-gather this rank's verdict and ``sizes`` (one row of fixed size on
    ``device``); raise on every rank if any rank had a problem. Returns every
    rank's sizes, in rank order."""
    row = torch.tensor([problem is not None, *sizes.values()], dtype=torch.int64, device=device)
    everyone = [torch.empty_like(row) for _ in range(group.size())]
    dist.all_gather(everyone, row, group=group)
    table = torch.stack(everyone).tolist()
    raise_problems(operation, problem, [bool(values[0]) for values in table])
    return [dict(zip(sizes, values[1:])) for values in table]


def run_checks(
    operation: str,
    group: dist.ProcessGroup,
    device: torch.device,
    checks: Callable[[], tuple[Any, dict[str, int]]],
    names: tuple[str, ...],
) -> Any:
    """Run ``checks()`` (returning a result and the sizes named ``names``);
    where checks may synchronise, make every rank of ``group`` learn every
    rank's verdict and sizes and raise together, on a problem or when the
    ranks' sizes differ. Returns the result."""
    try:
        result, sizes = checks()
        problem = None
    except (TypeError, ValueError) as error:
        result, sizes, problem = None, dict.fromkeys(names, 0), error
    if not backend.range_checks_enabled(device):
        if problem is not None:
            raise problem
        return result
    check_agreement(operation, exchange_verdicts(operation, group, device, problem, sizes), describe)
    return result


def check_bytes(name: str, value: object) -> int:
    """A buffer size: an int in [0, 2**63)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int; got {type(value).__name__}")
    if not 0 <= value <= MAX_BYTES:
        raise ValueError(f"{name} must be in [0, 2**63); got {value}")
    return value


def check_flag(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool; got {type(value).__name__}")
    return value


def check_layout_against_topk(
    topk_idx: torch.Tensor | None,
    num_experts: int,
    num_tokens_per_rank: torch.Tensor,
    num_tokens_per_rdma_rank: torch.Tensor | None,
    num_tokens_per_expert: torch.Tensor,
    is_token_in_rank: torch.Tensor,
    num_nodes: int,
) -> None:
    """Check that a dispatch's layout arguments say what ``topk_idx`` (and
    ``is_token_in_rank``) imply, as :meth:`Buffer.get_dispatch_layout` would
    compute them: the counts per rank and node match ``is_token_in_rank``, the
    counts per expert match ``topk_idx``, and every rank holding one of a
    token's experts is marked in ``is_token_in_rank`` (a token sent to a rank
    without its experts only costs bytes). Reads the tensors: a device sync."""
    num_tokens, num_ranks = is_token_in_rank.shape
    tokens_to_rank = is_token_in_rank.sum(dim=0)
    if not torch.equal(num_tokens_per_rank, tokens_to_rank.to(torch.int32)):
        raise ValueError(
            f"num_tokens_per_rank {num_tokens_per_rank.tolist()} does not match is_token_in_rank, "
            f"which sends {tokens_to_rank.tolist()}"
        )
    if num_tokens_per_rdma_rank is not None:
        tokens_to_node = is_token_in_rank.view(num_tokens, num_nodes, num_ranks // num_nodes).any(dim=2).sum(dim=0)
        if not torch.equal(num_tokens_per_rdma_rank, tokens_to_node.to(torch.int32)):
            raise ValueError(
                f"num_tokens_per_rdma_rank {num_tokens_per_rdma_rank.tolist()} does not match is_token_in_rank, "
                f"which reaches nodes {tokens_to_node.tolist()}"
            )
    if topk_idx is None:
        return
    check_range("topk_idx", topk_idx, 0, num_experts, ignore=-1)
    valid = topk_idx >= 0
    experts = topk_idx[valid]
    per_expert = torch.bincount(experts, minlength=num_experts)
    if not torch.equal(num_tokens_per_expert, per_expert.to(torch.int32)):
        wrong = int((num_tokens_per_expert != per_expert).nonzero()[0, 0])
        raise ValueError(
            f"num_tokens_per_expert does not match topk_idx: expert {wrong} is given "
            f"{int(num_tokens_per_expert[wrong])} tokens, topk_idx routes {int(per_expert[wrong])} to it"
        )
    holder = experts // (num_experts // num_ranks)
    missing = ~is_token_in_rank[valid.nonzero()[:, 0], holder]
    if bool(missing.any()):
        token = int(valid.nonzero()[:, 0][missing][0])
        rank = int(holder[missing][0])
        raise ValueError(
            f"is_token_in_rank leaves out rank {rank} for token {token}, whose expert "
            f"{int(experts[missing][0])} that rank holds; the token would never reach it"
        )


def check_token_fields(x) -> tuple[list[torch.Tensor], bool]:
    """x (a tensor, or an FP8 pair) -> its fields, and whether it is FP8."""
    if isinstance(x, (tuple, list)):
        if len(x) != 2:
            raise ValueError(f"x as a tuple must be (x_fp8, scales); got {len(x)} elements")
        x_fp8, scales = x
        check_tensor("x[0]", x_fp8, dtype=torch.float8_e4m3fn, ndim=2)
        num_tokens, hidden = x_fp8.shape
        check_divisible("x[0].shape[1] (hidden)", hidden, GROUP, "128 for FP8")
        check_tensor("x[1]", scales, dtype=torch.float32, shape=(num_tokens, hidden // GROUP), device=x_fp8.device)
        return [x_fp8, scales], True
    check_tensor("x", x, dtype=HIDDEN_DTYPES, ndim=2)
    return [x], False
