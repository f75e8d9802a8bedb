"""Scale-factor layouts under DeepGEMM's names: MN-major, TMA-aligned tensors, and
the same packed into UE8M0 (four power-of-two scales an int32), as its kernels
read them.

"MN-major, TMA-aligned": a scale tensor ``[..., mn, sf_k]`` stored with mn
contiguous and padded to 16 bytes, so strides ``(..., 1, aligned_mn)``. dsinfra's
implementations read scales through their strides, so these layouts cost
nothing extra there and exist for code written against DeepGEMM.
"""

from __future__ import annotations

import torch

from dsinfra.deep_gemm.utils import align, ceil_div, get_mn_major_tma_aligned_tensor, get_tma_aligned_size
from dsinfra.validation import check_positive, check_tensor

_EXPONENT_SHIFT = 23


def _ue8m0_bytes(sf: torch.Tensor) -> torch.Tensor:
    """float32 scales -> their exponent bytes (a power of two's UE8M0 code; other
    values are truncated to the power of two below, as DeepGEMM's packing does)."""
    return (sf.reshape(-1).view(torch.int32).view(sf.shape) >> _EXPONENT_SHIFT).to(torch.uint8)


def get_mn_major_tma_aligned_packed_ue8m0_tensor(sf: torch.Tensor, psum_layout: torch.Tensor | None = None) -> torch.Tensor:
    """sf: ``[mn, sf_k]`` or ``[num_groups, mn, sf_k]`` float32 UE8M0 scales -> int32
    ``[..., mn, ceil(sf_k/4)]``, four scales a word along sf_k (zero bytes past it),
    MN-major with mn padded to 4 (strides ``(ceil(sf_k/4) * aligned_mn, 1, aligned_mn)``).

    psum_layout: DeepGEMM's prefix-sum row layout, whose gap rows its packing skips;
    accepted (every row is packed here).
    """
    check_tensor("sf", sf, dtype=torch.float32)
    if sf.dim() not in (2, 3):
        raise ValueError(f"sf must have 2 or 3 dimensions; got shape {list(sf.shape)}")
    if psum_layout is not None:
        check_tensor("psum_layout", psum_layout, dtype=torch.int32, ndim=1)
    batched = sf if sf.dim() == 3 else sf.unsqueeze(0)
    groups, mn, sf_k = batched.shape
    words = ceil_div(sf_k, 4)
    padded = torch.zeros(groups, mn, 4 * words, dtype=torch.uint8, device=sf.device)
    padded[..., :sf_k] = _ue8m0_bytes(batched)
    aligned_mn = get_tma_aligned_size(mn, 4)
    packed = torch.zeros(groups, words, aligned_mn, dtype=torch.int32, device=sf.device).transpose(1, 2)[:, :mn]
    packed.copy_(padded.view(torch.int32))
    return packed if sf.dim() == 3 else packed.squeeze(0)


def get_k_grouped_mn_major_tma_aligned_packed_ue8m0_tensor(
    sf: torch.Tensor, grouped_layout: torch.Tensor, ks_cpu, gran_k: int = 128, k_alignment: int = 128, use_psum_layout: bool = False
) -> torch.Tensor:
    """K-grouped scales ``[sum(ceil(k_g/gran_k)), mn]`` float32 (each group's rows
    back to back) -> int32 ``[sum(ceil(k_g/(4 gran_k))), mn]``: each group's scale
    rows packed four to a word along K, zero bytes past its own.

    Groups: ks_cpu, or with ``use_psum_layout`` the end rows in grouped_layout
    (group g owns rows ``align(end[g-1], k_alignment) <= r < end[g]``; ks_cpu may then
    be None or [], or upper bounds, which are not needed here).
    """
    check_tensor("sf", sf, dtype=torch.float32, ndim=2)
    check_positive("gran_k", gran_k)
    check_positive("k_alignment", k_alignment)
    check_tensor("grouped_layout", grouped_layout, dtype=torch.int32, ndim=1)
    if use_psum_layout:
        ends = grouped_layout.tolist()
        starts = [0] + [align(end, k_alignment) for end in ends[:-1]]
        ks = [end - start for start, end in zip(starts, ends)]
    elif ks_cpu is None or len(ks_cpu) != grouped_layout.numel():
        raise ValueError(f"ks_cpu must give the {grouped_layout.numel()} groups' sizes; got {ks_cpu!r}")
    else:
        ks = list(ks_cpu)
    rows = [ceil_div(k, gran_k) for k in ks]
    check_tensor("sf", sf, shape=(sum(rows), "mn"))
    return torch.cat([_pack_rows(sf[:0])] + [_pack_rows(group) for group in sf.split(rows)])


def _pack_rows(sf: torch.Tensor) -> torch.Tensor:
    """[rows, mn] float32 UE8M0 -> [ceil(rows/4), mn] int32, four rows a word."""
    words, columns = ceil_div(sf.shape[0], 4), sf.shape[1]
    if words == 0:
        return torch.zeros(0, columns, dtype=torch.int32, device=sf.device)
    padded = torch.zeros(4 * words, columns, dtype=torch.uint8, device=sf.device)
    padded[: sf.shape[0]] = _ue8m0_bytes(sf)
    return padded.view(words, 4, columns).transpose(1, 2).contiguous().view(torch.int32).view(words, columns)


def transform_sf_into_required_layout(
    sf: torch.Tensor, mn: int, k: int, recipe, num_groups: int | None = None, is_sfa: bool | None = None,
    disable_ue8m0_cast: bool = False, psum_layout: torch.Tensor | None = None,
) -> torch.Tensor:  # fmt: skip
    """Scales in the layout DeepGEMM's SM90 kernels take (dsinfra follows them):
    float32 per-row scales (gran_mn 1) become MN-major and TMA-aligned
    (:func:`get_mn_major_tma_aligned_tensor`); float32 block scales and packed UE8M0
    int32 scales come back as they are, after a shape check.

    sf: ``[(num_groups,) ceil(mn/gran_mn), ceil(k/gran_k)]`` (int32: ``ceil(.../4)`` words along k).
    recipe: (gran_m, gran_n, gran_k) with ``is_sfa`` saying which of m, n applies, or
    (gran_mn, gran_k).
    """
    if not isinstance(recipe, (tuple, list)) or len(recipe) not in (2, 3):
        raise TypeError(f"recipe must be (gran_mn, gran_k) or (gran_m, gran_n, gran_k); got {recipe!r}")
    if len(recipe) == 3:
        if is_sfa is None:
            raise ValueError("is_sfa must say whether a 3-entry recipe's gran_m (True) or gran_n (False) applies")
        gran_mn, gran_k = (recipe[0] if is_sfa else recipe[1]), recipe[2]
    else:
        gran_mn, gran_k = recipe
    check_tensor("sf", sf, dtype=(torch.float32, torch.int32))
    columns = ceil_div(k, gran_k) if sf.dtype == torch.float32 else ceil_div(ceil_div(k, gran_k), 4)
    shape = (ceil_div(mn, gran_mn), columns) if num_groups is None else (num_groups, ceil_div(mn, gran_mn), columns)
    check_tensor("sf", sf, shape=shape)
    if sf.dtype == torch.float32 and gran_mn == 1:
        return get_mn_major_tma_aligned_tensor(sf)
    return sf
