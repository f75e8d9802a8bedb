"""The grouped layouts of DeepGEMM's M- and K-grouped GEMMs, read into one form.

M-grouped, contiguous: the rows of ``a`` hold every group's rows back to back,
each group's segment starting at a multiple of the alignment
(:func:`dsinfra.deep_gemm.get_mk_alignment_for_contiguous_layout`). The layout is
``m_indices`` (each row's group, -1 for a padding row) or, with
``use_psum_layout``, the groups' end rows (a prefix sum: group g owns rows
``align(end[g-1]) <= r < end[g]``; rows up to ``align(end[g])`` are its padding).
Both become ``m_indices`` here, plus which rows are padding.

K-grouped: groups of ``ks[g]`` rows of ``a`` and ``b`` back to back, or with
``use_psum_layout`` the groups' end rows (group g owns rows
``align(end[g-1]) <= r < end[g]``).
"""

from __future__ import annotations

import torch

from dsinfra import backend
from dsinfra.deep_gemm.utils import get_mk_alignment_for_contiguous_layout
from dsinfra.validation import check_range, check_tensor


def _aligned(x: torch.Tensor, alignment: int) -> torch.Tensor:
    return (x + alignment - 1) // alignment * alignment


def check_m_indices(name: str, m_indices: torch.Tensor, num_groups: int) -> None:
    """Every value is a group or -1, and every aligned block of rows holds one group
    (besides -1): checks that need a device sync, so run where range checks do."""
    check_range(name, m_indices, 0, num_groups, ignore=-1)
    if m_indices.numel() == 0 or not backend.range_checks_enabled(m_indices.device):
        return
    alignment = get_mk_alignment_for_contiguous_layout()
    blocks = torch.nn.functional.pad(m_indices, (0, -m_indices.numel() % alignment), value=-1).view(-1, alignment)
    highest = blocks.amax(dim=1)
    lowest = torch.where(blocks >= 0, blocks, num_groups).amin(dim=1)
    mixed = ((highest >= 0) & (lowest != highest)).nonzero()
    if mixed.numel():
        block = int(mixed[0])
        raise ValueError(
            f"{name} must give each aligned block of {alignment} rows one group (or -1); rows "
            f"{block * alignment}..{(block + 1) * alignment - 1} mix groups {int(lowest[block])} and {int(highest[block])}"
        )


def check_psum(name: str, ends: torch.Tensor, rows: int) -> None:
    """Each group's end is at or after its aligned start, and the last at most ``rows``."""
    if ends.numel() == 0 or not backend.range_checks_enabled(ends.device):
        return
    starts = torch.cat((ends.new_zeros(1), _aligned(ends[:-1], get_mk_alignment_for_contiguous_layout())))
    short = (ends < starts).nonzero()
    if short.numel():
        group = int(short[0])
        raise ValueError(f"{name} must hold each group's end row, at or after its aligned start; group {group} ends at {int(ends[group])} before {int(starts[group])}")
    check_range(name, ends, 0, rows + 1)


def psum_rows(ends: torch.Tensor, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Group end rows [num_groups] -> (m_indices [rows] int32 with -1 off the groups,
    [rows] bool: the padding rows between each group's end and its aligned end)."""
    alignment = get_mk_alignment_for_contiguous_layout()
    row = torch.arange(rows, dtype=torch.int64, device=ends.device)
    ends = ends.to(torch.int64)
    segment = torch.searchsorted(_aligned(ends, alignment), row, right=True)  # the group whose aligned segment holds the row
    inside = segment < ends.numel()
    owned = inside & (row < ends[segment.clamp(max=max(ends.numel() - 1, 0))]) if ends.numel() else inside
    return torch.where(owned, segment, -1).to(torch.int32), inside & ~owned


def runs(m_indices: torch.Tensor) -> list[tuple[int, int, int]]:
    """(group, first row, row count) of each run of equal entries that is a group (not -1)."""
    groups, counts = torch.unique_consecutive(m_indices, return_counts=True)
    result, start = [], 0
    for group, count in zip(groups.tolist(), counts.tolist()):
        if group >= 0:
            result.append((group, start, count))
        start += count
    return result


def k_groups(name: str, ks: object, layout: torch.Tensor | None, rows: int, use_psum_layout: bool) -> list[tuple[int, int]]:
    """(first row, row count) of each K group, from ``ks`` (sizes back to back) or,
    with ``use_psum_layout``, from ``layout``'s end rows (a host sync)."""
    if use_psum_layout:
        check_tensor("grouped_layout", layout, dtype=torch.int32, ndim=1)
        check_psum("grouped_layout", layout, rows)
        alignment = get_mk_alignment_for_contiguous_layout()
        ends = layout.tolist()
        starts = [0] + [-(-end // alignment) * alignment for end in ends[:-1]]
        return [(start, end - start) for start, end in zip(starts, ends)]
    if not isinstance(ks, (list, tuple)) or not all(isinstance(k, int) and not isinstance(k, bool) for k in ks):
        raise TypeError(f"{name} must be a sequence of ints; got {ks!r}")
    if any(k < 0 for k in ks) or sum(ks) != rows:
        raise ValueError(f"{name} must be sizes >= 0 that add up to a[0].shape[0] ({rows}); got {list(ks)}")
    if layout is not None:
        check_tensor("grouped_layout", layout, dtype=torch.int32, shape=(len(ks),))
        if backend.range_checks_enabled(layout.device) and layout.tolist() != list(ks):
            raise ValueError(f"grouped_layout must hold {name} ({list(ks)}); holds {layout.tolist()}")
    starts = [sum(ks[:g]) for g in range(len(ks))]
    return list(zip(starts, ks))


def gathered_rows(groups: list[tuple[int, int]], rows: int, device: torch.device) -> torch.Tensor | None:
    """Indices of the groups' rows back to back, or None when they already are (rows 0..rows-1 in order)."""
    if [start for start, _ in groups] == [sum(count for _, count in groups[:g]) for g in range(len(groups))] and sum(
        count for _, count in groups
    ) == rows:
        return None
    pieces = [torch.arange(start, start + count, dtype=torch.int64) for start, count in groups]
    return torch.cat(pieces or [torch.zeros(0, dtype=torch.int64)]).to(device)
