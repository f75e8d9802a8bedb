"""The GPU path: block-scaled FP8 GEMM kernels in Triton.

Each program owns output tiles of ``BLOCK_M x BLOCK_N`` (persistently: the grid
is at most :func:`dsinfra.deep_gemm.get_num_sms` programs, each looping over
tiles). For every 128-wide block of K it multiplies the FP8 tiles into a fresh
float32 product and adds it to the accumulator times the block's LHS scales (one
per row) and RHS scales (one per 128 rows, or per row for 1x128 RHS scaling):
DeepGEMM's promotion, which keeps FP8 products from accumulating in the tensor
core's narrower accumulator across blocks.

On GPUs whose ``tl.dot`` takes FP8 (sm_89 and newer, and the interpreter) the
tiles go to the dot as they are. Older GPUs get the operands as bytes, and the
kernel decodes them to fp16 exactly (sign-extend, shift left by 7, keep bit 15
and bits 13..7: the fp16 bits of ``x * 2^-8``) and multiplies the scales by 2^16.

The grouped kernels read the layout on the device: ``m_indices`` per 128-row
tile (contiguous layout: a tile's rows belong to one group or are -1, which
are not stored) and ``masked_m`` per group (tiles past it do nothing), so no
host sync is needed. The K-grouped kernel runs each group's own K range.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dsinfra.deep_gemm.utils import ceil_div, get_num_sms, rhs_rows_per_scale
from dsinfra.fp8 import GROUP
from dsinfra.triton_utils import CompileCase, Target, capturing, dot, launch, meta_tensor, target_for

# what the M-grouped kernel's layout argument holds: nothing, m_indices or masked_m
_MODE_DENSE, _MODE_CONTIGUOUS, _MODE_MASKED = tl.constexpr(0), tl.constexpr(1), tl.constexpr(2)
_DECODED_PRODUCT_FACTOR = tl.constexpr(2.0**16)  # two operands decoded as x * 2^-8 each


@triton.jit
def _decode_e4m3(x):
    """uint8 bits of float8_e4m3fn -> the same values times 2^-8, as fp16 (exact)."""
    bits = x.to(tl.int8, bitcast=True).to(tl.int16)
    bits = ((bits << 7) & -16512).to(tl.int16)  # 0xbf80: bit 15 (sign) and bits 13..7 (eeee mmm)
    return bits.to(tl.float16, bitcast=True)


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
    BLOCK_K: tl.constexpr, FP8_DOT: tl.constexpr,
):  # fmt: skip
    """sum over the 128-wide K blocks in [k_start, k_stop) of
    sa[:, block] * sb[:, block] * (A[:, block] @ B[:, block].T), in float32."""
    offs_k = tl.arange(0, BLOCK_K)
    sb_rows = offs_n // RHS_ROWS_PER_SCALE
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for block in range(0, tl.cdiv(k_stop - k_start, BLOCK_K)):
        k = k_start + block * BLOCK_K + offs_k
        k_mask = k < k_stop
        a_ptrs = a_ptr + offs_m[:, None] * stride_am + k[None, :] * stride_ak
        b_ptrs = b_ptr + offs_n[:, None] * stride_bn + k[None, :] * stride_bk
        a = tl.load(a_ptrs, mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=n_mask[:, None] & k_mask[None, :], other=0.0)
        sa = tl.load(sa_ptr + offs_m * stride_sam + (scale_start + block) * stride_sak, mask=m_mask, other=0.0)
        sb = tl.load(sb_ptr + sb_rows * stride_sbn + (scale_start + block) * stride_sbk, mask=n_mask, other=0.0)
        if not FP8_DOT:
            a = _decode_e4m3(a)
            b = _decode_e4m3(b)
            sa = sa * _DECODED_PRODUCT_FACTOR
        product = dot(a, tl.trans(b), tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32))
        acc += product * sa[:, None] * sb[None, :]
    return acc


@triton.jit
def _m_grouped_gemm_kernel(
    a_ptr, sa_ptr, b_ptr, sb_ptr, d_ptr, c_ptr, layout_ptr,
    M, N, K, num_groups,
    stride_ag, stride_am, stride_ak, stride_sag, stride_sam, stride_sak,
    stride_bg, stride_bn, stride_bk, stride_sbg, stride_sbn, stride_sbk,
    stride_dg, stride_dm, stride_dn, stride_cm, stride_cn,
    MODE: tl.constexpr, HAS_C: tl.constexpr, RHS_ROWS_PER_SCALE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    SWIZZLE: tl.constexpr, FP8_DOT: tl.constexpr,
):  # fmt: skip
    """D[g] (+ C) = A[g] @ B[g].T over M-grouped tiles: one group (dense), the group
    of each tile's rows (contiguous, layout = m_indices), or groups with their own
    row counts (masked, layout = masked_m)."""
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    tiles_per_group = tiles_m * tiles_n
    num_tiles = tiles_per_group * num_groups if MODE == _MODE_MASKED else tiles_per_group
    for tile in range(tl.program_id(0), num_tiles, tl.num_programs(0)):
        group = tile // tiles_per_group  # 0 but in the masked mode
        pid_m, pid_n = _tile_program(tile % tiles_per_group, tiles_m, tiles_n, SWIZZLE)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
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
        if (pid_m * BLOCK_M < rows) & (group >= 0):
            g = group.to(tl.int64)
            acc = _block_scaled_product(
                a_ptr + g * stride_ag, sa_ptr + g * stride_sag,
                b_ptr + g * stride_bg, sb_ptr + g * stride_sbg,
                offs_m.to(tl.int64), offs_n.to(tl.int64), m_mask, n_mask, 0, K, 0,
                stride_am, stride_ak, stride_sam, stride_sak, stride_bn, stride_bk, stride_sbn, stride_sbk,
                RHS_ROWS_PER_SCALE, BLOCK_M, BLOCK_N, BLOCK_K, FP8_DOT,
            )  # fmt: skip
            if HAS_C:
                acc += tl.load(c_ptr + offs_m[:, None] * stride_cm + offs_n[None, :] * stride_cn, mask=store_mask, other=0.0)
            d_ptrs = d_ptr + g * stride_dg + offs_m[:, None].to(tl.int64) * stride_dm + offs_n[None, :] * stride_dn
            tl.store(d_ptrs, acc.to(d_ptr.dtype.element_ty), mask=store_mask)


@triton.jit
def _k_grouped_gemm_kernel(
    a_ptr, sa_ptr, b_ptr, sb_ptr, d_ptr, c_ptr, k_offsets_ptr, scale_offsets_ptr,
    M, N, num_groups,
    stride_ak, stride_am, stride_sak, stride_sam,
    stride_bk, stride_bn, stride_sbk, stride_sbn,
    stride_dg, stride_dm, stride_dn, stride_cg, stride_cm, stride_cn,
    HAS_C: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    SWIZZLE: tl.constexpr, FP8_DOT: tl.constexpr,
):  # fmt: skip
    """D[g] (+ C[g]) = A[K_g].T @ B[K_g], K_g the rows k_offsets[g]:k_offsets[g+1]
    of A [sum_k, M] and B [sum_k, N], scaled per 128 of those rows from scale row
    scale_offsets[g] on."""
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    tiles_per_group = tiles_m * tiles_n
    for tile in range(tl.program_id(0), tiles_per_group * num_groups, tl.num_programs(0)):
        group = tile // tiles_per_group
        pid_m, pid_n = _tile_program(tile % tiles_per_group, tiles_m, tiles_n, SWIZZLE)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        m_mask = offs_m < M
        n_mask = offs_n < N
        acc = _block_scaled_product(
            a_ptr, sa_ptr, b_ptr, sb_ptr,
            offs_m, offs_n, m_mask, n_mask,
            tl.load(k_offsets_ptr + group).to(tl.int64), tl.load(k_offsets_ptr + group + 1).to(tl.int64),
            tl.load(scale_offsets_ptr + group).to(tl.int64),
            stride_am, stride_ak, stride_sam, stride_sak, stride_bn, stride_bk, stride_sbn, stride_sbk,
            1, BLOCK_M, BLOCK_N, BLOCK_K, FP8_DOT,
        )  # fmt: skip
        store_mask = m_mask[:, None] & n_mask[None, :]
        group = group.to(tl.int64)
        if HAS_C:
            c_ptrs = c_ptr + group * stride_cg + offs_m[:, None] * stride_cm + offs_n[None, :] * stride_cn
            acc += tl.load(c_ptrs, mask=store_mask, other=0.0)
        d_ptrs = d_ptr + group * stride_dg + offs_m[:, None] * stride_dm + offs_n[None, :] * stride_dn
        tl.store(d_ptrs, acc.to(d_ptr.dtype.element_ty), mask=store_mask)


def _operands(device: torch.device, *tensors: torch.Tensor) -> tuple[bool, list[torch.Tensor]]:
    """Whether the kernels take FP8 tiles to the dot on ``device``, and the FP8
    tensors as the kernels read them there (themselves, or their bytes)."""
    fp8_dot = target_for(device).fp8_dot == "e4m3fn"
    return fp8_dot, [t if fp8_dot else t.view(torch.uint8) for t in tensors]


def _launch_config(m: int) -> dict[str, int]:
    """Tile sizes and launch settings for ``m`` rows per group (BLOCK_M divides 128,
    the contiguous layout's alignment)."""
    block_m = 64 if m <= 64 else 128
    return {"BLOCK_M": block_m, "BLOCK_N": 128, "BLOCK_K": GROUP, "SWIZZLE": 8, "num_warps": block_m // 16, "num_stages": 3}


def _grid(num_tiles: int) -> tuple[int]:
    return (max(1, min(num_tiles, get_num_sms())),)


def _group_strides(tensor: torch.Tensor) -> tuple[int, ...]:
    """Strides with a leading group stride: 0 for a 2-D tensor every group shares."""
    return tensor.stride() if tensor.dim() == 3 else (0, *tensor.stride())


def _launch_m_grouped(a, sa, b, sb, d, c, layout, mode: tl.constexpr, num_groups: int, config_m: int) -> None:
    """Launch the M-grouped kernel: a, sa and d are [num_groups, m, ...] in the
    masked mode and 2-D (shared) otherwise; b and sb [num_groups, n, ...] or 2-D."""
    m, k = a.shape[-2:]
    n = b.shape[-2]
    fp8_dot, (a, b) = _operands(d.device, a, b)
    config = _launch_config(config_m)
    tiles = ceil_div(m, config["BLOCK_M"]) * ceil_div(n, config["BLOCK_N"]) * (num_groups if mode == _MODE_MASKED else 1)
    c_strides = c.stride() if c is not None else (0, 0)
    launch(
        _m_grouped_gemm_kernel, _grid(tiles),
        a, sa, b, sb, d, c if c is not None else d, layout if layout is not None else d,
        m, n, k, num_groups,
        *_group_strides(a), *_group_strides(sa), *_group_strides(b), *_group_strides(sb), *_group_strides(d), *c_strides,
        MODE=mode.value, HAS_C=c is not None, RHS_ROWS_PER_SCALE=rhs_rows_per_scale(sb, n), FP8_DOT=fp8_dot, **config,
    )  # fmt: skip


def fp8_gemm_nt(a, sa, b, sb, d, c) -> None:
    """d = c + (a * sa) @ (b * sb).T; see :func:`dsinfra.deep_gemm.fp8_gemm_nt`."""
    if a.shape[0] == 0:
        return
    _launch_m_grouped(a, sa, b, sb, d, c, None, _MODE_DENSE, 1, a.shape[0])


def m_grouped_fp8_gemm_nt_contiguous(a, sa, b, sb, d, m_indices) -> None:
    """Each 128-row tile multiplies b[its group]; rows marked -1 are not stored."""
    if a.shape[0] == 0:
        return
    _launch_m_grouped(a, sa, b, sb, d, None, m_indices, _MODE_CONTIGUOUS, b.shape[0], a.shape[0])


def m_grouped_fp8_gemm_nt_masked(a, sa, b, sb, d, masked_m, expected_m) -> None:
    """Group g computes its first masked_m[g] rows; tile sizes follow expected_m."""
    _launch_m_grouped(a, sa, b, sb, d, None, masked_m, _MODE_MASKED, b.shape[0], expected_m)


def k_grouped_fp8_gemm_tn_contiguous(a, sa, b, sb, d, ks, c) -> None:
    """One tile loop over every group's output; each runs its own K range."""
    num_groups, m, n = d.shape
    k_offsets = torch.tensor([0] + ks, dtype=torch.int64).cumsum(0)
    scale_offsets = torch.tensor([0] + [ceil_div(k, GROUP) for k in ks], dtype=torch.int64).cumsum(0)
    fp8_dot, (a, b) = _operands(d.device, a, b)
    config = _launch_config(m)
    tiles = ceil_div(m, config["BLOCK_M"]) * ceil_div(n, config["BLOCK_N"]) * num_groups
    c_strides = c.stride() if c is not None else (0, 0, 0)
    launch(
        _k_grouped_gemm_kernel, _grid(tiles),
        a, sa, b, sb, d, c if c is not None else d, k_offsets.to(d.device), scale_offsets.to(d.device),
        m, n, num_groups,
        *a.stride(), *sa.stride(), *b.stride(), *sb.stride(), *d.stride(), *c_strides,
        HAS_C=c is not None, FP8_DOT=fp8_dot, **config,
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
            cases.append(CompileCase({"": "dense", "m": m, "n": n, "k": k}, launches[0], wgmma=True,
                                     representative=(m, n, k) == (128, 2112, 7168)))
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
                                     wgmma=True, representative=(groups, expected_m, n, k) == (32, 20, 4096, 4096)))
    for groups, m, n, k in REPORT_K_GROUPED:
        ks = [k] * groups
        with capturing(target) as launches:
            k_grouped_fp8_gemm_tn_contiguous(
                _fp8(groups * k, m), _scales(groups * k // GROUP, m), _fp8(groups * k, n), _scales(groups * k // GROUP, n),
                meta_tensor(groups, m, n, dtype=torch.float32), ks, meta_tensor(groups, m, n, dtype=torch.float32))
        cases.append(CompileCase({"": "k-grouped", "groups": groups, "m": m, "n": n, "k": k}, launches[0], wgmma=True,
                                 representative=groups == 4 and m == 4096))
    return cases
