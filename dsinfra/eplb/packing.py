"""Balanced packing: ``num_items`` weighted items into ``num_packs`` packs of
``num_items // num_packs`` items each, for many independent rows at once.

A placement is a ``slots`` array ``[rows, num_packs, items_per_pack]`` of item
indices; every item stands in exactly one slot of its row. Weights are float64
numpy arrays ``[rows, num_items]``. The planner works in numpy because these
loops take many small steps, and a numpy call on a small array costs about a
microsecond where a torch call costs several.
"""

from __future__ import annotations

import numpy as np

# How many of the lightest packs the heaviest pack tries to swap with: all of
# them in a node of up to this many GPUs, the lightest this many in larger ones.
SWAP_PARTNERS = 8
# A swap must lower the heaviest pack by more than this fraction: it keeps
# rounding noise from counting as progress.
MIN_GAIN = 1e-12


def greedy_pack(weights: np.ndarray, num_packs: int, order: np.ndarray | None = None) -> np.ndarray:
    """DeepSeek's balanced packing: items heaviest first (equal weights: lower
    index first), each into the lightest pack that still has room (equal loads:
    lower pack first). Slots fill in placement order. Pack loads add up in
    ``weights``' dtype.

    weights: [rows, num_items], float64 or float32; order: [rows, num_items],
    int64, the items heaviest first, if given (any order of equal weights).
    Returns slots: [rows, num_packs, num_items // num_packs], int64.
    """
    rows, num_items = weights.shape
    per_pack = num_items // num_packs
    row = np.arange(rows)
    if order is None:
        order = np.argsort(-weights, axis=1, kind="stable")
    sorted_weights = np.take_along_axis(weights, order, 1)
    pack_loads = np.zeros((rows, num_packs), dtype=weights.dtype)  # +inf once a pack is full
    filled = np.zeros((rows, num_packs), dtype=np.int64)
    slots = np.empty((rows, num_packs, per_pack), dtype=np.int64)
    for step in range(num_items):
        pack = pack_loads.argmin(1)
        position = filled[row, pack]
        slots[row, pack, position] = order[:, step]
        filled[row, pack] = position + 1
        pack_loads[row, pack] += np.where(position + 1 == per_pack, np.inf, sorted_weights[:, step])
    return slots


def round_pack(weights: np.ndarray, num_packs: int) -> np.ndarray:
    """A quicker packing: items heaviest first in rounds of ``num_packs``; each
    round gives its heaviest item to the lightest pack, its next to the next
    lightest, and so on. One step per slot of a pack instead of one per item.

    weights: [rows, num_items], float64. Returns slots: [rows, num_packs, num_items // num_packs], int64.
    """
    rows, num_items = weights.shape
    per_pack = num_items // num_packs
    order = np.argsort(-weights, axis=1).reshape(rows, per_pack, num_packs)
    sorted_weights = np.take_along_axis(weights, order.reshape(rows, -1), 1).reshape(rows, per_pack, num_packs)
    pack_loads = np.zeros((rows, num_packs))
    slots = np.empty((rows, num_packs, per_pack), dtype=np.int64)
    for position in range(per_pack):
        lightest_first = np.argsort(pack_loads, axis=1)
        np.put_along_axis(slots[:, :, position], lightest_first, order[:, position], 1)
        np.put_along_axis(
            pack_loads, lightest_first, np.take_along_axis(pack_loads, lightest_first, 1) + sorted_weights[:, position], 1
        )
    return slots


def pack_loads(weights: np.ndarray, slots: np.ndarray) -> np.ndarray:
    """The load of every pack: [rows, num_packs], float64."""
    rows = slots.shape[0]
    return np.take_along_axis(weights, slots.reshape(rows, -1), 1).reshape(slots.shape).sum(2)


def improve_packing(weights: np.ndarray, slots: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Lower the heaviest pack of every row by swapping items: each round, the
    heaviest pack swaps one of its items with one of a lighter pack (among the
    ``SWAP_PARTNERS`` lightest), the swap that leaves the lower maximum of the
    two. A row stops when no swap lowers its heaviest pack, or when that pack is
    down to ``target`` (a load below which lowering it gains nothing).

    No pack ever ends heavier than the heaviest pack was before, so the maximum
    never rises. Each swap lowers the sorted pack loads lexicographically, so
    the search ends; the rounds are capped at the number of items all the same.

    weights: [rows, num_items], float64; slots: [rows, num_packs, per_pack],
    int64, changed in place and returned; target: [rows], float64.
    """
    rows, num_packs, per_pack = slots.shape
    slot_weights = np.take_along_axis(weights, slots.reshape(rows, -1), 1).reshape(slots.shape)
    num_partners = min(num_packs, SWAP_PARTNERS)
    active = np.arange(rows)
    for _ in range(num_packs * per_pack):
        row = np.arange(active.size)
        current = slot_weights[active]  # [active, num_packs, per_pack]
        loads = current.sum(2)
        heavy = loads.argmax(1)
        heaviest = loads[row, heavy]
        if num_partners < num_packs:
            partners = np.argpartition(loads, num_partners - 1, axis=1)[:, :num_partners]
        else:
            partners = np.broadcast_to(np.arange(num_packs), (active.size, num_packs))
        # moved[r, i, k, j]: the weight the heaviest pack sheds by swapping its
        # item i for item j of partner k (negative: weight it takes on).
        moved = current[row, heavy][:, :, None, None] - current[row[:, None], partners][:, None]
        partner_loads = loads[row[:, None], partners][:, None, :, None]
        after = np.maximum(heaviest[:, None, None, None] - moved, partner_loads + moved).reshape(active.size, -1)
        best = after.argmin(1)
        better = (after[row, best] < heaviest * (1 - MIN_GAIN)) & (heaviest > target[active])
        active, heavy, best, partners = active[better], heavy[better], best[better], partners[better]
        if active.size == 0:
            break
        item, rest = np.divmod(best, num_partners * per_pack)
        partner_index, partner_item = np.divmod(rest, per_pack)
        partner = partners[np.arange(active.size), partner_index]
        for array in (slots, slot_weights):
            given = array[active, heavy, item].copy()
            array[active, heavy, item] = array[active, partner, partner_item]
            array[active, partner, partner_item] = given
    return slots
