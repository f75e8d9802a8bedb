"""The GPU path: block-scaled FP8 GEMM kernels in Triton.

Each program owns output tiles of ``BLOCK_M x BLOCK_N`` (persistently: the grid
is at most one program per SM, each looping over tiles). For every ``BLOCK_K``
block of K it multiplies the FP8 tiles into a fresh float32 product and adds it
to the accumulator times the block's LHS scales (one per row) and RHS scales
(one per 128 rows, or per row for 1x128 RHS scaling): DeepGEMM's promotion,
which keeps FP8 products from accumulating in the tensor core's narrower
accumulator across blocks. The promotion of block ``i`` is written after the
dot of block ``i + 1`` is issued, so that its multiply-adds can run while the
tensor cores work on the next block.

How the FP8 tiles reach the dot depends on the target (``Target.fp8_dot``):
as they are (sm_89 and newer, and the interpreter); as float8_e4m3fnuz bits
(gfx942's FP8 MFMA: the same bits mean half the value, and -0 is turned into +0
since it means NaN there), the product scaled by 4; or decoded from bytes to
fp16 exactly (``x * 2^-8``, older GPUs), the product scaled by 2^16.

Tile sizes come from a table (:func:`gemm_config`) that fills the SMs: narrower
tiles and split-K for decode shapes (a handful of rows against a large weight),
128x128 tiles for the rest. On a GPU, the first call of each shape class also
times the table's choice against its neighbours (:func:`triton.autotune`) and
keeps the fastest; the interpreter and the `kernels` report use the table.

The grouped kernels read the layout on the device: ``m_indices`` per tile
(contiguous layout: a tile's rows belong to one group or are -1, which are not
stored) and ``masked_m`` per group (masked layout: the programs enumerate only
the tiles under ``masked_m``), so no host sync is needed. The K-grouped kernel
runs each group's own K range. Offsets are 64-bit wherever a product of sizes
can pass 2^31.
"""

from __future__ import annotations


import torch
import triton
import triton.language as tl

from dsinfra.deep_gemm.utils import ceil_div, get_num_sms, rhs_rows_per_scale
from dsinfra.fp8 import GROUP
from dsinfra.triton_utils import (
    CompileCase, Target, autotuning, capturing, decode_e4m3, dot, launch, meta_tensor, target_for,
)

# what the M-grouped kernel's layout argument holds: nothing, m_indices or masked_m
_MODE_DENSE, _MODE_CONTIGUOUS, _MODE_MASKED = tl.constexpr(0), tl.constexpr(1), tl.constexpr(2)
# how FP8 tiles reach the dot (Target.fp8_dot)
_FP8_AS_IS, _FP8_FNUZ, _FP8_DECODED = tl.constexpr(0), tl.constexpr(1), tl.constexpr(2)
_FP8_MODES = {"e4m3fn": 0, "fnuz": 1, "fp16": 2}


@triton.jit
def _dot_operand(x, FP8_MODE: tl.constexpr):
    """An FP8 tile as the dot takes it on this target."""
    if FP8_MODE == _FP8_DECODED:
        x = decode_e4m3(x)
    elif FP8_MODE == _FP8_FNUZ:
        x = tl.where(x == 0x80, 0, x).to(tl.float8e4b8, bitcast=True)
    return x


@triton.jit
def _product_factor(FP8_MODE: tl.constexpr):
    """What a product of two tiles from :func:`_dot_operand` must be multiplied by."""
    if FP8_MODE == _FP8_DECODED:
        return 65536.0  # two operands decoded as x * 2^-8
    elif FP8_MODE == _FP8_FNUZ:
        return 4.0  # two operands read as x / 2
    else:
        return 1.0


@triton.jit
def _tile_program(tile, tiles_m, tiles_n, SWIZZLE: tl.constexpr):
    """The (row, column) of output tile ``tile``, in groups of SWIZZLE tile rows
    so that neighbouring programs share operand tiles in L2."""
    tiles_per_band = SWIZZLE * tiles_n
    band = tile // tiles_per_band
    first_m = band * SWIZZLE
    band_height = tl.minimum(tiles_m - first_m, SWIZZLE)
    pid_m = first_m + (tile % tiles_per_band) % band_height
    pid_n = (tile % tiles_per_band) // band_height
    return pid_m, pid_n


@triton.jit
def _block_scaled_product(
    a_ptr, sa_ptr, b_ptr, sb_ptr,
    offs_m, offs_n, m_mask, n_mask, k_start, k_stop, scale_start,
    stride_am, stride_ak, stride_sam, stride_sak,
    stride_bn, stride_bk, stride_sbn, stride_sbk,
    RHS_ROWS_PER_SCALE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, FP8_MODE: tl.constexpr,
):  # fmt: skip
    """sum over the BLOCK_K-wide blocks of K in [k_start, k_stop) of
    sa[:, block] * sb[:, block] * (A[:, block] @ B[:, block].T), in float32
    (``offs_m``, ``offs_n`` int64; scale column ``scale_start`` belongs to k_start,
    one per 128 of K)."""
    offs_k = tl.arange(0, BLOCK_K)
    sb_rows = offs_n // RHS_ROWS_PER_SCALE
    a_rows = a_ptr + offs_m[:, None] * stride_am
    b_rows = b_ptr + offs_n[:, None] * stride_bn
    sa_rows = sa_ptr + offs_m * stride_sam
    sb_rows = sb_ptr + sb_rows * stride_sbn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for block in range(0, tl.cdiv(k_stop - k_start, BLOCK_K)):
        k = k_start + block * BLOCK_K + offs_k
        k_mask = k < k_stop
        a = tl.load(a_rows + k[None, :] * stride_ak, mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        b = tl.load(b_rows + k[None, :] * stride_bk, mask=n_mask[:, None] & k_mask[None, :], other=0.0)
        scale_column = scale_start + block * BLOCK_K // 128
        sa = tl.load(sa_rows + scale_column * stride_sak, mask=m_mask, other=0.0) * _product_factor(FP8_MODE)
        sb = tl.load(sb_rows + scale_column * stride_sbk, mask=n_mask, other=0.0)
        product = dot(_dot_operand(a, FP8_MODE), tl.trans(_dot_operand(b, FP8_MODE)), tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32))
        acc += product * (sa[:, None] * sb[None, :])
    return acc


@triton.jit
def _m_grouped_tile(tile, layout_ptr, tiles_m, tiles_n, num_groups,
                    MODE: tl.constexpr, BLOCK_M: tl.constexpr, SWIZZLE: tl.constexpr):
    """(group, tile row, tile column) of tile number ``tile``. In the masked mode the
    tiles are numbered over each group's ceil(masked_m[g] / BLOCK_M) tile rows only."""
    if MODE == _MODE_MASKED:
        row_tile = tile // tiles_n
        group = 0
        pid_m = 0
        first = 0  # the group's first row tile
        for g in range(0, num_groups):
            rows_g = tl.cdiv(tl.load(layout_ptr + g), BLOCK_M)
            inside = (row_tile >= first) & (row_tile < first + rows_g)
            group = tl.where(inside, g, group)
            pid_m = tl.where(inside, row_tile - first, pid_m)
            first += rows_g
        return group, pid_m, tile % tiles_n
    pid_m, pid_n = _tile_program(tile, tiles_m, tiles_n, SWIZZLE)
    return pid_m * 0, pid_m, pid_n


@triton.jit
def _m_grouped_gemm_kernel(
    a_ptr, sa_ptr, b_ptr, sb_ptr, d_ptr, c_ptr, layout_ptr,
    M, N, K, num_groups,
    stride_ag, stride_am, stride_ak, stride_sag, stride_sam, stride_sak,
    stride_bg, stride_bn, stride_bk, stride_sbg, stride_sbn, stride_sbk,
    stride_dg, stride_dm, stride_dn, stride_cm, stride_cn, stride_split,
    MODE: tl.constexpr, HAS_C: tl.constexpr, RHS_ROWS_PER_SCALE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr, SWIZZLE: tl.constexpr, FP8_MODE: tl.constexpr,
):  # fmt: skip
    """D[g] (+ C) = A[g] @ B[g].T over M-grouped tiles: one group (dense), the group
    of each tile's rows (contiguous, layout = m_indices), or groups with their own
    row counts (masked, layout = masked_m). With SPLIT_K > 1 (dense only), split
    ``s`` of K writes its float32 partial sum to D + s * stride_split instead."""
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    if MODE == _MODE_MASKED:
        row_tiles = 0
        for each in range(0, num_groups):
            row_tiles += tl.cdiv(tl.load(layout_ptr + each), BLOCK_M)
        num_tiles = row_tiles * tiles_n
    else:
        num_tiles = tiles_m * tiles_n * SPLIT_K
    k_per_split = tl.cdiv(tl.cdiv(K, SPLIT_K), 128) * 128  # splits start on a scale block
    for tile in range(tl.program_id(0), num_tiles, tl.num_programs(0)):
        split = tile % SPLIT_K
        group, pid_m, pid_n = _m_grouped_tile(tile // SPLIT_K, layout_ptr, tiles_m, tiles_n, num_groups,
                                              MODE, BLOCK_M, SWIZZLE)
        offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
        rows = M
        if MODE == _MODE_MASKED:
            rows = tl.load(layout_ptr + group)
        m_mask = offs_m < rows
        n_mask = offs_n < N
        store_mask = m_mask[:, None] & n_mask[None, :]
        if MODE == _MODE_CONTIGUOUS:
            row_groups = tl.load(layout_ptr + offs_m, mask=m_mask, other=-1)
            group = tl.max(row_groups, axis=0)
            store_mask &= (row_groups == group)[:, None]
        if group >= 0:
            group64 = group.to(tl.int64)
            k_start = split * k_per_split
            acc = _block_scaled_product(
                a_ptr + group64 * stride_ag, sa_ptr + group64 * stride_sag,
                b_ptr + group64 * stride_bg, sb_ptr + group64 * stride_sbg,
                offs_m, offs_n, m_mask, n_mask, k_start, tl.minimum(K, k_start + k_per_split), k_start // 128,
                stride_am, stride_ak, stride_sam, stride_sak, stride_bn, stride_bk, stride_sbn, stride_sbk,
                RHS_ROWS_PER_SCALE, BLOCK_M, BLOCK_N, BLOCK_K, FP8_MODE,
            )  # fmt: skip
            if HAS_C:
                acc += tl.load(c_ptr + offs_m[:, None] * stride_cm + offs_n[None, :] * stride_cn, mask=store_mask, other=0.0)
            d_ptrs = d_ptr + group64 * stride_dg + split * stride_split + offs_m[:, None] * stride_dm + offs_n[None, :] * stride_dn
            tl.store(d_ptrs, acc.to(d_ptr.dtype.element_ty), mask=store_mask)


@triton.jit
def _split_k_sum_kernel(
    partial_ptr, d_ptr, c_ptr, M, N, stride_split, stride_dm, stride_dn, stride_cm, stride_cn,
    HAS_C: tl.constexpr, SPLIT_K: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """D (+ C) = the sum of SPLIT_K float32 partial products [SPLIT_K, M, N], in split order."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < M * N
    m = offs // N
    n = offs % N
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    if HAS_C:
        acc = tl.load(c_ptr + m * stride_cm + n * stride_cn, mask=mask, other=0.0)
    for split in tl.static_range(SPLIT_K):
        acc += tl.load(partial_ptr + split * stride_split + offs, mask=mask, other=0.0)
    tl.store(d_ptr + m * stride_dm + n * stride_dn, acc.to(d_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _k_grouped_gemm_kernel(
    a_ptr, sa_ptr, b_ptr, sb_ptr, d_ptr, c_ptr, k_offsets_ptr, scale_offsets_ptr,
    M, N, num_groups,
    stride_ak, stride_am, stride_sak, stride_sam,
    stride_bk, stride_bn, stride_sbk, stride_sbn,
    stride_dg, stride_dm, stride_dn, stride_cg, stride_cm, stride_cn,
    HAS_C: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    SWIZZLE: tl.constexpr, FP8_MODE: tl.constexpr,
):  # fmt: skip
    """D[g] (+ C[g]) = A_g.T @ B_g, A_g and B_g the columns k_offsets[g]:k_offsets[g+1]
    (multiples of 128; zeros past a group's own rows) of the K-major A [M, width] and
    B [N, width], scaled per 128 of them from scale row scale_offsets[g] on."""
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    tiles_per_group = tiles_m * tiles_n
    for tile in range(tl.program_id(0), tiles_per_group * num_groups, tl.num_programs(0)):
        group = tile // tiles_per_group
        pid_m, pid_n = _tile_program(tile % tiles_per_group, tiles_m, tiles_n, SWIZZLE)
        offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
        m_mask = offs_m < M
        n_mask = offs_n < N
        acc = _block_scaled_product(
            a_ptr, sa_ptr, b_ptr, sb_ptr,
            offs_m, offs_n, m_mask, n_mask,
            tl.multiple_of(tl.load(k_offsets_ptr + group), 128), tl.multiple_of(tl.load(k_offsets_ptr + group + 1), 128),
            tl.load(scale_offsets_ptr + group),
            stride_am, stride_ak, stride_sam, stride_sak, stride_bn, stride_bk, stride_sbn, stride_sbk,
            1, BLOCK_M, BLOCK_N, BLOCK_K, FP8_MODE,
        )  # fmt: skip
        store_mask = m_mask[:, None] & n_mask[None, :]
        g = group.to(tl.int64)
        if HAS_C:
            acc += tl.load(c_ptr + g * stride_cg + offs_m[:, None] * stride_cm + offs_n[None, :] * stride_cn, mask=store_mask, other=0.0)
        tl.store(d_ptr + g * stride_dg + offs_m[:, None] * stride_dm + offs_n[None, :] * stride_dn, acc, mask=store_mask)


def programs_per_sm(target: Target) -> int:
    """Programs each SM runs at once: two, so that one program's promotion (the
    multiply-adds after its MMAs complete) runs while the other's tensor-core work
    is in flight, as DeepGEMM's two math warpgroups take turns; one where FP8 is
    decoded to fp16 in the kernel, whose program takes 8 warps (see
    :func:`gemm_config`) and the registers of both."""
    return 1 if target.fp8_dot == "fp16" else 2


def gemm_config(target: Target, m: int, n: int, k: int, groups: int = 1, split_k_allowed: bool = False) -> dict[str, int]:
    """The table's tile sizes for ``groups`` GEMMs of ``m`` rows (per group) by ``n``
    by ``k`` on ``target``: 64 x 128 tiles on 4 warps (one warpgroup, as each of
    DeepGEMM's math warpgroups owns 64 rows; 8 warps where FP8 is decoded to fp16
    in the kernel, on 4 the decoded tiles spill registers), narrower N tiles (down to 32) while
    there are fewer tiles than programs, then (where allowed) K cut into splits of
    at least four 128-blocks; as many pipeline stages (2 to 4) as a program's share
    of the shared memory holds."""
    programs = programs_per_sm(target) * target.num_sms
    block_m, block_n = 64, 128
    while block_n > 32 and ceil_div(m, block_m) * ceil_div(n, block_n) * groups < programs:
        block_n //= 2
    tiles = ceil_div(m, block_m) * ceil_div(n, block_n) * groups
    split_k = 1
    if split_k_allowed and tiles < programs:
        split_k = max(1, min(ceil_div(programs, tiles), k // (4 * GROUP)))
    shared = target.shared_bytes // programs_per_sm(target) - 2 * 1024  # what one program may use, less scratch
    decoded = 2 if target.fp8_dot == "fp16" else 0  # bytes per element of the decoded copies the dot reads
    block_k = GROUP
    while True:
        stage = (block_m + block_n) * block_k
        stages = min(4, (shared - decoded * stage) // stage)
        if stages >= 2 or block_k == 32:
            break
        block_k //= 2
    return {"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k, "SPLIT_K": split_k, "SWIZZLE": 8,
            "num_warps": 8 if decoded else 4, "num_stages": max(1, stages)}


def _neighbours(config: dict[str, int]) -> list[dict[str, int]]:
    """Configurations the autotuner times against the table's: N tiles twice as wide
    or half as wide, one stage fewer."""
    found = [config]
    for block_n in (config["BLOCK_N"] * 2, config["BLOCK_N"] // 2):
        if 32 <= block_n <= 256:
            found.append({**config, "BLOCK_N": block_n})
    if config["num_stages"] > 2:
        found.append({**config, "num_stages": config["num_stages"] - 1})
    return found


_TUNED_KEYS = ("BLOCK_N", "num_warps", "num_stages")
_tuners: dict = {}


def _launch_tuned(kernel, tiles, config: dict[str, int], *args, **constants) -> None:
    """Launch ``kernel`` persistently over ``tiles(BLOCK_M, BLOCK_N)`` tiles: with the
    table's configuration, or on a GPU through a cached :func:`triton.autotune` over
    it and its neighbours (the first call of a shape times them all)."""
    sms = get_num_sms() * programs_per_sm(target_for(args[0].device))
    if not autotuning():
        grid = (max(1, min(tiles(config["BLOCK_M"], config["BLOCK_N"]), sms)),)
        launch(kernel, grid, *args, **constants, **config)
        return
    fixed = {key: value for key, value in config.items() if key not in _TUNED_KEYS}
    tuner_key = (kernel, tuple(sorted(config.items())))
    if tuner_key not in _tuners:
        configs = [triton.Config({"BLOCK_N": c["BLOCK_N"]}, num_warps=c["num_warps"], num_stages=c["num_stages"])
                   for c in _neighbours(config)]
        _tuners[tuner_key] = triton.autotune(configs, key=["N", "K"] if "K" in kernel.arg_names else ["N"],
                                             restore_value=["d_ptr"])(kernel)
    grid = lambda meta: (max(1, min(tiles(fixed["BLOCK_M"], meta["BLOCK_N"]), sms)),)  # noqa: E731
    _tuners[tuner_key][grid](*args, **constants, **fixed)


def _fp8_operands(device: torch.device, *tensors: torch.Tensor) -> tuple[int, list[torch.Tensor]]:
    """How the kernels take FP8 tiles on ``device`` (``FP8_MODE``) and the FP8 tensors
    as they read them there (themselves, or their bytes)."""
    mode = _FP8_MODES[target_for(device).fp8_dot]
    return mode, [t if mode == 0 else t.view(torch.uint8) for t in tensors]


def _group_strides(tensor: torch.Tensor) -> tuple[int, ...]:
    """Strides with a leading group stride: 0 for a 2-D tensor every group shares."""
    return tensor.stride() if tensor.dim() == 3 else (0, *tensor.stride())


def _launch_m_grouped(a, sa, b, sb, d, c, layout, mode: tl.constexpr, num_groups: int, config_m: int) -> None:
    """Launch the M-grouped kernel: a, sa and d are [num_groups, m, ...] in the
    masked mode and 2-D (shared) otherwise; b and sb [num_groups, n, ...] or 2-D."""
    m, k = a.shape[-2:]
    n = b.shape[-2]
    fp8_mode, (a, b) = _fp8_operands(d.device, a, b)
    masked = mode == _MODE_MASKED
    config = gemm_config(target_for(d.device), config_m, n, k, num_groups if masked else 1,
                         split_k_allowed=mode == _MODE_DENSE)
    split_k = config["SPLIT_K"]
    out, out_c = (d, c) if split_k == 1 else (torch.empty(split_k, m, n, dtype=torch.float32, device=d.device), None)

    def tiles(block_m, block_n):  # the masked mode's count is expected, its programs loop over the real one
        row_tiles = num_groups * ceil_div(config_m, block_m) if masked else ceil_div(m, block_m)
        return row_tiles * ceil_div(n, block_n) * split_k

    c_strides = out_c.stride() if out_c is not None else (0, 0)
    out_strides = _group_strides(out) if split_k == 1 else (0, n, 1)
    _launch_tuned(
        _m_grouped_gemm_kernel, tiles, config,
        a, sa, b, sb, out, out_c if out_c is not None else out, layout if layout is not None else out,
        m, n, k, num_groups,
        *_group_strides(a), *_group_strides(sa), *_group_strides(b), *_group_strides(sb), *out_strides, *c_strides,
        m * n if split_k > 1 else 0,
        MODE=mode.value, HAS_C=out_c is not None, RHS_ROWS_PER_SCALE=rhs_rows_per_scale(sb, n), FP8_MODE=fp8_mode,
    )  # fmt: skip
    if split_k > 1:
        block = 1024
        c_strides = c.stride() if c is not None else (0, 0)
        launch(
            _split_k_sum_kernel, (ceil_div(m * n, block),),
            out, d, c if c is not None else d, m, n, m * n, *d.stride(), *c_strides,
            HAS_C=c is not None, SPLIT_K=split_k, BLOCK=block, num_warps=4,
        )  # fmt: skip


def fp8_gemm_nt(a, sa, b, sb, d, c) -> None:
    """d = c + (a * sa) @ (b * sb).T; see :func:`dsinfra.deep_gemm.fp8_gemm_nt`."""
    if a.shape[0] == 0:
        return
    _launch_m_grouped(a, sa, b, sb, d, c, None, _MODE_DENSE, 1, a.shape[0])


def m_grouped_fp8_gemm_nt_contiguous(a, sa, b, sb, d, m_indices) -> None:
    """Each tile multiplies b[its group]; rows marked -1 are not stored."""
    if a.shape[0] == 0:
        return
    _launch_m_grouped(a, sa, b, sb, d, None, m_indices, _MODE_CONTIGUOUS, b.shape[0], a.shape[0] // b.shape[0])


def m_grouped_fp8_gemm_nt_masked(a, sa, b, sb, d, masked_m, expected_m) -> None:
    """Group g computes its first masked_m[g] rows; tile sizes follow expected_m."""
    _launch_m_grouped(a, sa, b, sb, d, None, masked_m, _MODE_MASKED, b.shape[0], expected_m)


def _k_major_groups(x: torch.Tensor, ks: list[int], starts: list[int]) -> torch.Tensor:
    """x [sum(ks), mn] -> [mn, starts[-1]]: group g's rows as the columns from
    ``starts[g]`` on, zeros up to the next start."""
    out = torch.empty(x.shape[1], starts[-1], dtype=x.dtype, device=x.device)
    for k, start, end, rows in zip(ks, starts, starts[1:], x.split(ks)):
        out[:, start:start + k] = rows.t()
        out[:, start + k:end] = 0
    return out


def k_grouped_fp8_gemm_tn_contiguous(a, sa, b, sb, d, ks, c) -> None:
    """One tile loop over every group's output; each runs its own K range. The
    operands are first laid out K-major, each group starting on a 128-column
    boundary: FP8 MMAs read K-major tiles, and aligned groups let every tile load
    16 bytes at a time through async copies."""
    num_groups, m, n = d.shape
    starts = [0]
    for k in ks:
        starts.append(starts[-1] + ceil_div(k, GROUP) * GROUP)
    k_offsets = torch.tensor(starts, dtype=torch.int32)  # int32 K coordinates (the row offsets are int64)
    scale_offsets = (k_offsets // GROUP).to(torch.int32)
    fp8_mode, (a, b) = _fp8_operands(d.device, _k_major_groups(a, ks, starts), _k_major_groups(b, ks, starts))
    config = gemm_config(target_for(d.device), m, n, max(ks, default=0), num_groups)
    del config["SPLIT_K"]
    c_strides = c.stride() if c is not None else (0, 0, 0)
    _launch_tuned(
        _k_grouped_gemm_kernel, lambda block_m, block_n: ceil_div(m, block_m) * ceil_div(n, block_n) * num_groups, config,
        a, sa, b, sb, d, c if c is not None else d, k_offsets.to(d.device), scale_offsets.to(d.device),
        m, n, num_groups,
        a.stride(1), a.stride(0), *sa.stride(), b.stride(1), b.stride(0), *sb.stride(), *d.stride(), *c_strides,
        HAS_C=c is not None, FP8_MODE=fp8_mode,
    )  # fmt: skip


# DeepSeek-V3's GEMM shapes (DeepGEMM's test tables) for the `kernels` report.
REPORT_DENSE_NK = ((2112, 7168), (576, 7168), (24576, 1536), (32768, 512), (7168, 16384), (4096, 7168), (7168, 2048))
REPORT_DENSE_M = (64, 128, 4096)
REPORT_GROUPED_NK = ((6144, 7168), (7168, 3072), (4096, 4096), (4096, 2048))
REPORT_CONTIGUOUS = ((4, 8192), (8, 4096))  # (groups, m per group)
REPORT_MASKED = ((32, 192), (6, 1024), (32, 20), (6, 20))  # (groups, expected m), m_max 4096
REPORT_K_GROUPED = ((4, 4096, 7168, 8192), (4, 7168, 2048, 8192), (8, 4096, 7168, 4096), (16, 7168, 2048, 2048))


def _fp8(*shape):
    return meta_tensor(*shape, dtype=torch.float8_e4m3fn)


def _scales(*shape):
    return meta_tensor(*shape, dtype=torch.float32)


def compile_cases(target: Target) -> list[CompileCase]:
    """Every GEMM as DeepSeek-V3's shapes launch it for ``target``: dense (m 64, 128,
    4096), contiguous and masked M-grouped, K-grouped (weight gradients)."""
    cases = []
    for m in REPORT_DENSE_M:
        for n, k in REPORT_DENSE_NK:
            with capturing(target) as launches:
                fp8_gemm_nt(_fp8(m, k), _scales(m, ceil_div(k, GROUP)), _fp8(n, k),
                            _scales(ceil_div(n, GROUP), ceil_div(k, GROUP)), meta_tensor(m, n, dtype=torch.bfloat16), None)
            config = {"": "dense", "m": m, "n": n, "k": k}
            representative = (m, n, k) == (128, 2112, 7168)
            cases += [CompileCase(config, each, wgmma="gemm" in each.kernel.__name__, representative=representative)
                      for each in launches]
    for n, k in REPORT_GROUPED_NK:
        for groups, m in REPORT_CONTIGUOUS:
            with capturing(target) as launches:
                m_grouped_fp8_gemm_nt_contiguous(
                    _fp8(groups * m, k), _scales(groups * m, ceil_div(k, GROUP)), _fp8(groups, n, k),
                    _scales(groups, ceil_div(n, GROUP), ceil_div(k, GROUP)),
                    meta_tensor(groups * m, n, dtype=torch.bfloat16), meta_tensor(groups * m, dtype=torch.int32))
            cases.append(CompileCase({"": "contiguous", "groups": groups, "m": m, "n": n, "k": k}, launches[0], wgmma=True))
        for groups, expected_m in REPORT_MASKED:
            with capturing(target) as launches:
                m_grouped_fp8_gemm_nt_masked(
                    _fp8(groups, 4096, k), _scales(groups, 4096, ceil_div(k, GROUP)), _fp8(groups, n, k),
                    _scales(groups, ceil_div(n, GROUP), ceil_div(k, GROUP)),
                    meta_tensor(groups, 4096, n, dtype=torch.bfloat16), meta_tensor(groups, dtype=torch.int32), expected_m)
            cases.append(CompileCase({"": "masked", "groups": groups, "m": expected_m, "n": n, "k": k}, launches[0],
                                     wgmma=True))
    for groups, m, n, k in REPORT_K_GROUPED:
        with capturing(target) as launches:
            k_grouped_fp8_gemm_tn_contiguous(
                _fp8(groups * k, m), _scales(groups * k // GROUP, m), _fp8(groups * k, n), _scales(groups * k // GROUP, n),
                meta_tensor(groups, m, n, dtype=torch.float32), [k] * groups, meta_tensor(groups, m, n, dtype=torch.float32))
        cases.append(CompileCase({"": "k-grouped", "groups": groups, "m": m, "n": n, "k": k}, launches[0], wgmma=True,
                                 representative=(groups, m) == (4, 4096)))
    return cases


from dsinfra.deep_gemm.triton_mqa_logits import mqa_logits, paged_mqa_logits  # noqa: E402,F401
from dsinfra.deep_gemm.torch_impl import bf16_gemm_nt  # noqa: E402,F401  (on a GPU: cuBLAS through torch.matmul)
