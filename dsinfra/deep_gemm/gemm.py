"""DeepGEMM's GEMM API as its current releases have it: FP8 and FP4 GEMMs in every
memory layout (``nt``, ``nn``, ``tn``, ``tt``), M-grouped (contiguous, by row
indices or prefix sums; masked) and K-grouped GEMMs, with its scaling recipes.

Every function checks its arguments (TypeError/ValueError naming the argument),
then transforms them onto the implementations :func:`dsinfra.backend.choose`
picks: transposed views for the layouts, ``m_indices`` for prefix sums, one
scale per row (or per 128-row block of a weight) for coarser recipes. FP8
operands scaled per 128 of K run the FP8 implementations; FP4 operands and
other scale granularities are dequantised into float32 (:mod:`.operands`) and
multiplied by the float GEMM (``bf16_gemm_nt``), since no device here has FP4
arithmetic.
"""

from __future__ import annotations

import torch

from dsinfra import backend
from dsinfra.deep_gemm.grouping import check_m_indices, check_psum, gathered_rows, k_groups, psum_rows, runs
from dsinfra.deep_gemm.operands import Operand, check_granularity, dequantised, operand, pair, transposed_pair
from dsinfra.deep_gemm.utils import ceil_div, get_mk_alignment_for_contiguous_layout
from dsinfra.fp8 import GROUP, fp8_to_float
from dsinfra.validation import check_positive, check_range, check_tensor

OUT_DTYPES = (torch.bfloat16, torch.float32)
KERNEL_ROWS = 128  # the FP8 kernels' row tiles lie within aligned blocks of this many rows


def implementation(operation: str, device: torch.device):
    return backend.load("dsinfra.deep_gemm", backend.choose(operation, device))


def check_options(compiled_dims: object, disable_ue8m0_cast: object = False) -> None:
    """DeepGEMM's compilation hints: checked, and of no effect here (``compiled_dims``
    names the dimensions its JIT specialises on; ``disable_ue8m0_cast`` stops its
    SM100 kernels from rounding float32 scales to powers of two, which dsinfra never does)."""
    if not isinstance(compiled_dims, str):
        raise TypeError(f"compiled_dims must be a str; got {type(compiled_dims).__name__}")
    if not isinstance(disable_ue8m0_cast, bool):
        raise TypeError(f"disable_ue8m0_cast must be a bool; got {type(disable_ue8m0_cast).__name__}")


def _recipes(recipe, recipe_a, recipe_b) -> tuple[tuple[int, int] | None, tuple[int, int] | None]:
    """The (gran_mn, gran_k) of a and of b: from ``recipe`` (gran_m, gran_n, gran_k),
    from ``recipe_a`` and ``recipe_b`` (gran_mn, gran_k) each, or the defaults (None)."""
    if recipe is not None:
        if recipe_a is not None or recipe_b is not None:
            raise ValueError("give either recipe or recipe_a and recipe_b, not both")
        gran_m, gran_n, gran_k = check_granularity("recipe", recipe, 3)
        return (gran_m, gran_k), (gran_n, gran_k)
    if (recipe_a is None) != (recipe_b is None):
        raise ValueError("recipe_a and recipe_b come together")
    if recipe_a is None:
        return None, None
    return check_granularity("recipe_a", recipe_a, 2), check_granularity("recipe_b", recipe_b, 2)


def _check_k(names: tuple[str, str], x: Operand, y: Operand) -> int:
    k = x.values.shape[-1]
    if y.values.shape[-1] != k:
        raise ValueError(f"{names[0]} and {names[1]} must have the same k; got {k} and {y.values.shape[-1]}")
    return k


def check_accumulator(c: torch.Tensor | None, d: torch.Tensor) -> None:
    """c, when given, has d's shape, dtype and device (it may be d itself)."""
    if c is not None:
        check_tensor("c", c, dtype=d.dtype, shape=tuple(d.shape), device=d.device)


def product(x: Operand, y: Operand, d: torch.Tensor, c: torch.Tensor | None) -> None:
    """d = c + x @ y.T for 2-D operands, through the FP8 implementation when both are
    FP8 scaled per 128 of K, else through the float GEMM."""
    if x.native and y.native:
        fp8_gemm = implementation("fp8_gemm_nt", d.device).fp8_gemm_nt
        if c is None or d.dtype == torch.float32:
            fp8_gemm(x.values, x.scales, y.values, y.scales, d, c)
        else:  # the FP8 implementations accumulate into float32
            accumulator = c.float()
            fp8_gemm(x.values, x.scales, y.values, y.scales, accumulator, accumulator)
            d.copy_(accumulator)
    else:
        implementation("bf16_gemm_nt", d.device).bf16_gemm_nt(dequantised(x), dequantised(y), d, c)


def dense(x: Operand, y: Operand, d: torch.Tensor, c: torch.Tensor | None, names=("a", "b", "d")) -> None:
    """d = c + x @ y.T with checks: x [m, k], y [n, k], d [m, n] bfloat16 or float32."""
    k = _check_k(names[:2], x, y)
    m, n = x.values.shape[0], y.values.shape[0]
    check_tensor(names[2], d, dtype=OUT_DTYPES, shape=(m, n), device=x.values.device)
    check_accumulator(c, d)
    if m == 0 or n == 0:
        return
    if k == 0:
        d.copy_(c) if c is not None else d.zero_()
        return
    product(x, y, d, c)


def _operands(a, b, recipe, recipe_a, recipe_b, names=("a", "b")) -> tuple[Operand, Operand]:
    granularity_a, granularity_b = _recipes(recipe, recipe_a, recipe_b)
    return operand(names[0], a, granularity_a, weight=False), operand(names[1], b, granularity_b, weight=True)


def fp8_fp4_gemm_nt(a, b, d, c=None, recipe=None, recipe_a=None, recipe_b=None, compiled_dims="nk", disable_ue8m0_cast=False) -> None:
    """d = c + a @ b.T with FP8 (or FP4) operands and fine-grained scaling.

    a: (values ``[m, k]``, scales ``[ceil(m/gran_m), ceil(k/gran_k)]``); b: (values
        ``[n, k]``, scales ``[ceil(n/gran_n), ceil(k/gran_k)]``). Values float8_e4m3fn,
        or FP4 (torch.int8, two codes a byte along the contiguous dimension); scales
        float32 or packed UE8M0 (torch.int32, four a word along k); any strides.
    d: ``[m, n]`` torch.bfloat16 or torch.float32; written.
    c: optional ``[m, n]``, d's dtype, added (may be d itself).
    recipe: (gran_m, gran_n, gran_k), or recipe_a and recipe_b: (gran_mn, gran_k)
        each. By default (1, 128) for a and, for b, (128, 128) when its float32
        scales have one row per 128 rows, else (1, 128).
    compiled_dims, disable_ue8m0_cast: DeepGEMM's compilation hints, of no effect here.
    """
    check_options(compiled_dims, disable_ue8m0_cast)
    dense(*_operands(a, b, recipe, recipe_a, recipe_b), d, c)


def fp8_fp4_gemm_nn(a, b, d, c=None, recipe=None, recipe_a=None, recipe_b=None, compiled_dims="nk", disable_ue8m0_cast=False) -> None:
    """d = c + a @ b with b: (values ``[k, n]``, scales ``[ceil(k/gran_k), ceil(n/gran_n)]``);
    otherwise as :func:`fp8_fp4_gemm_nt`."""
    fp8_fp4_gemm_nt(a, transposed_pair("b", b), d, c, recipe, recipe_a, recipe_b, compiled_dims, disable_ue8m0_cast)


def fp8_fp4_gemm_tn(a, b, d, c=None, recipe=None, recipe_a=None, recipe_b=None, compiled_dims="mn", disable_ue8m0_cast=False) -> None:
    """d = c + a.T @ b with a: (values ``[k, m]``, scales ``[ceil(k/gran_k), ceil(m/gran_m)]``)
    and b as in :func:`fp8_fp4_gemm_nn`."""
    fp8_fp4_gemm_nt(transposed_pair("a", a), transposed_pair("b", b), d, c, recipe, recipe_a, recipe_b, compiled_dims, disable_ue8m0_cast)


def fp8_fp4_gemm_tt(a, b, d, c=None, recipe=None, recipe_a=None, recipe_b=None, compiled_dims="mn", disable_ue8m0_cast=False) -> None:
    """d = c + a.T @ b.T with a as in :func:`fp8_fp4_gemm_tn` and b as in :func:`fp8_fp4_gemm_nt`."""
    fp8_fp4_gemm_nt(transposed_pair("a", a), b, d, c, recipe, recipe_a, recipe_b, compiled_dims, disable_ue8m0_cast)


def fp8_gemm_nt_skip_head_mid(a, b, d, head_splits, recipe=None, compiled_dims="nk", disable_ue8m0_cast=False) -> None:
    """:func:`fp8_fp4_gemm_nt` whose output columns, in heads of ``left + right``, are
    written around a gap of ``mid`` columns per head that is left alone.

    head_splits: (left, mid, right); b's n a multiple of left + right; d:
    ``[m, n + n / (left + right) * mid]``.
    """
    check_options(compiled_dims, disable_ue8m0_cast)
    if not isinstance(head_splits, (tuple, list)) or len(head_splits) != 3:
        raise TypeError(f"head_splits must be a tuple (left, mid, right); got {head_splits!r}")
    left, mid, right = (check_positive("head_splits entries", split, allow_zero=True) for split in head_splits)
    x, y = _operands(a, b, recipe, None, None)
    m, n = x.values.shape[0], y.values.shape[0]
    if left + right == 0 or n % (left + right):
        raise ValueError(f"b's n ({n}) must be a multiple of left + right of head_splits {tuple(head_splits)}")
    heads = n // (left + right)
    check_tensor("d", d, dtype=OUT_DTYPES, shape=(m, n + heads * mid), device=x.values.device)
    packed = torch.empty(m, n, dtype=d.dtype, device=d.device)
    dense(x, y, packed, None)
    out, packed = d.view(m, heads, -1), packed.view(m, heads, left + right)
    out[:, :, :left] = packed[:, :, :left]
    out[:, :, left + mid :] = packed[:, :, left:]


def m_grouped_contiguous(x: Operand, y: Operand, d, layout, use_psum_layout, ensure_zero_padding, names) -> None:
    """d[r] = x[r] @ y[g(r)].T: checks, the layout read into m_indices, padding rows zeroed."""
    a_name, b_name, d_name, layout_name = names
    k = _check_k((a_name, b_name), x, y)
    m = x.values.shape[0]
    if y.values.dim() != 3:
        raise ValueError(f"{b_name}[0] must have 3 dimensions [num_groups, n, k]; got shape {list(y.values.shape)}")
    num_groups, n = y.values.shape[:2]
    check_tensor(d_name, d, dtype=torch.bfloat16, shape=(m, n), device=x.values.device)
    if use_psum_layout:
        check_tensor(layout_name, layout, dtype=torch.int32, shape=(num_groups,), device=d.device, contiguous=True)
        check_psum(layout_name, layout, m)
        m_indices, padding = psum_rows(layout, m)
    else:
        check_tensor(layout_name, layout, dtype=torch.int32, shape=(m,), device=d.device, contiguous=True)
        check_m_indices(layout_name, layout, num_groups)
        m_indices, padding = layout, layout < 0
    if m == 0 or n == 0:
        return
    if k > 0 and x.native and y.native and get_mk_alignment_for_contiguous_layout() % KERNEL_ROWS == 0:
        implementation("m_grouped_fp8_gemm_nt_contiguous", d.device).m_grouped_fp8_gemm_nt_contiguous(
            x.values, x.scales, y.values, y.scales, d, m_indices
        )
    else:  # one GEMM per run of rows of one group
        for group, start, count in runs(m_indices):
            rows = slice(start, start + count)
            dense(rows_of(x, rows), group_of(y, group), d[rows], None)
    if ensure_zero_padding or not use_psum_layout:
        d.masked_fill_(padding[:, None], 0)


def rows_of(x: Operand, rows: slice) -> Operand:
    """The operand's rows ``rows`` (its scales are one per row)."""
    return Operand(x.values[rows], None if x.scales is None else x.scales[rows])


def group_of(y: Operand, group: int) -> Operand:
    return Operand(y.values[group], None if y.scales is None else y.scales[group])


def m_grouped_fp8_fp4_gemm_nt_contiguous(
    a, b, d, grouped_layout, recipe=None, recipe_a=None, recipe_b=None, compiled_dims="nk", disable_ue8m0_cast=False,
    use_psum_layout=False, ensure_zero_padding=True, expected_m_for_psum_layout=None,
) -> None:  # fmt: skip
    """d[r] = a[r] @ b[g].T for each row r of group g: the MoE grouped GEMM, contiguous layout.

    a: (values ``[m, k]``, scales) as for :func:`fp8_fp4_gemm_nt`, every group's rows back
        to back, each segment starting at a multiple of
        :func:`get_mk_alignment_for_contiguous_layout`.
    b: (values ``[num_groups, n, k]``, scales ``[num_groups, ceil(n/gran_n), ceil(k/gran_k)]``).
    d: ``[m, n]`` torch.bfloat16.
    grouped_layout: torch.int32, contiguous: ``[m]`` each row's group or -1 (a padding
        row, written as zeros); or with ``use_psum_layout`` ``[num_groups]`` each group's
        end row (group g owns rows ``align(end[g-1]) <= r < end[g]``; with
        ``ensure_zero_padding`` the rows up to ``align(end[g])`` are written as zeros,
        else they and the rows past the last group are left alone).
    expected_m_for_psum_layout: a hint (> 0) with ``use_psum_layout``, of no effect here.
    """
    check_options(compiled_dims, disable_ue8m0_cast)
    for name, flag in (("use_psum_layout", use_psum_layout), ("ensure_zero_padding", ensure_zero_padding)):
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be a bool; got {type(flag).__name__}")
    if expected_m_for_psum_layout is not None:
        if not use_psum_layout:
            raise ValueError("expected_m_for_psum_layout goes with use_psum_layout=True")
        check_positive("expected_m_for_psum_layout", expected_m_for_psum_layout)
    x, y = _operands(a, b, recipe, recipe_a, recipe_b)
    m_grouped_contiguous(x, y, d, grouped_layout, use_psum_layout, ensure_zero_padding, ("a", "b", "d", "grouped_layout"))


def m_grouped_fp8_fp4_gemm_nn_contiguous(
    a, b, d, grouped_layout, recipe=None, recipe_a=None, recipe_b=None, compiled_dims="nk", disable_ue8m0_cast=False,
    use_psum_layout=False, ensure_zero_padding=True,
) -> None:  # fmt: skip
    """:func:`m_grouped_fp8_fp4_gemm_nt_contiguous` with b: (values ``[num_groups, k, n]``,
    scales ``[num_groups, ceil(k/gran_k), ceil(n/gran_n)]``)."""
    m_grouped_fp8_fp4_gemm_nt_contiguous(
        a, transposed_pair("b", b), d, grouped_layout, recipe, recipe_a, recipe_b, compiled_dims, disable_ue8m0_cast,
        use_psum_layout, ensure_zero_padding,
    )  # fmt: skip


def m_grouped_masked(x: Operand, y: Operand, d, masked_m, expected_m, names) -> None:
    """d[g, :masked_m[g]] = x[g, :masked_m[g]] @ y[g].T with checks."""
    a_name, b_name, d_name = names
    k = _check_k((a_name, b_name), x, y)
    if x.values.dim() != 3 or y.values.dim() != 3 or y.values.shape[0] != x.values.shape[0]:
        raise ValueError(
            f"{a_name}[0] and {b_name}[0] must have 3 dimensions and the same number of groups; "
            f"got shapes {list(x.values.shape)} and {list(y.values.shape)}"
        )
    num_groups, m_max = x.values.shape[:2]
    n = y.values.shape[1]
    check_tensor(d_name, d, dtype=torch.bfloat16, shape=(num_groups, m_max, n), device=x.values.device)
    check_tensor("masked_m", masked_m, dtype=torch.int32, shape=(num_groups,), device=d.device, contiguous=True)
    check_positive("expected_m", expected_m)
    check_range("masked_m", masked_m, 0, m_max + 1)
    if k > 0 and x.native and y.native:
        implementation("m_grouped_fp8_gemm_nt_masked", d.device).m_grouped_fp8_gemm_nt_masked(
            x.values, x.scales, y.values, y.scales, d, masked_m, expected_m
        )
        return
    for group, rows in enumerate(masked_m.tolist()):
        dense(rows_of(group_of(x, group), slice(0, rows)), group_of(y, group), d[group, :rows], None)


def m_grouped_fp8_fp4_gemm_nt_masked(
    a, b, d, masked_m, expected_m, recipe=None, recipe_a=None, recipe_b=None, compiled_dims="nk", disable_ue8m0_cast=False
) -> None:
    """d[g, :masked_m[g]] = a[g, :masked_m[g]] @ b[g].T: the MoE grouped GEMM, masked
    layout (what DeepEP's low-latency dispatch produces).

    a: (values ``[num_groups, m_max, k]``, scales ``[num_groups, m_max, ceil(k/gran_k)]``).
    b: (values ``[num_groups, n, k]``, scales) as for the contiguous layout.
    d: ``[num_groups, m_max, n]`` torch.bfloat16; rows past masked_m[g] are left alone.
    masked_m: ``[num_groups]`` torch.int32, contiguous, each in [0, m_max]; may stay on the GPU.
    expected_m: a hint for the typical masked_m, > 0 (picks the GPU tile size).
    """
    check_options(compiled_dims, disable_ue8m0_cast)
    x, y = _operands(a, b, recipe, recipe_a, recipe_b)
    m_grouped_masked(x, y, d, masked_m, expected_m, ("a", "b", "d"))


def k_grouped(x: Operand, y: Operand, d, c, ks: list[int], names=("a", "b")) -> None:
    """d[g] = c[g] + x_g.T @ y_g over groups of ks[g] rows back to back of x [sum_k, m]
    and y [sum_k, n] (FP8 with one scale row per 128 rows of a group, or already scaled)."""
    m, n = x.values.shape[1], y.values.shape[1]
    if y.values.shape[0] != x.values.shape[0]:
        raise ValueError(f"{names[0]} and {names[1]} must have the same rows; got {x.values.shape[0]} and {y.values.shape[0]}")
    check_tensor("d", d, dtype=torch.float32, shape=(len(ks), m, n), device=x.values.device)
    check_accumulator(c, d)
    if x.native and y.native:
        implementation("k_grouped_fp8_gemm_tn_contiguous", d.device).k_grouped_fp8_gemm_tn_contiguous(
            x.values, x.scales, y.values, y.scales, d, ks, c
        )
        return
    start = 0
    for group, count in enumerate(ks):
        rows = slice(start, start + count)
        dense(Operand(x.values[rows].T, None), Operand(y.values[rows].T, None), d[group], None if c is None else c[group])
        start += count


def _k_grouped_operand(name: str, value: object, groups: list[tuple[int, int]], gran_k: int) -> Operand:
    """A K-grouped FP8 operand: values [rows, mn] float8_e4m3fn, float32 scales with
    ceil(count/gran_k) rows per group. Returns its groups' rows back to back, as is
    with gran_k 128, else dequantised."""
    values, scales = pair(name, value)
    check_tensor(f"{name}[0]", values, dtype=torch.float8_e4m3fn, ndim=2)
    check_tensor(f"{name}[1]", scales, dtype=torch.float32, device=values.device)
    check_tensor(f"{name}[1]", scales, shape=(sum(ceil_div(count, gran_k) for _, count in groups), values.shape[1]))
    rows = gathered_rows(groups, values.shape[0], values.device)
    if rows is not None:
        values = values.view(torch.uint8)[rows].view(torch.float8_e4m3fn)  # the groups' rows back to back
    if gran_k == GROUP:
        return Operand(values, scales)
    per_row = torch.cat([scales.new_zeros(0, values.shape[1])] + [
        group_scales.repeat_interleave(gran_k, dim=0)[:count]
        for group_scales, (_, count) in zip(scales.split([ceil_div(count, gran_k) for _, count in groups]), groups)
    ])  # fmt: skip
    return Operand(fp8_to_float(values) * per_row, None)


def k_grouped_fp8_gemm_tn_contiguous(
    a, b, d, ks_cpu, grouped_layout=None, c=None, recipe=(1, 1, GROUP), compiled_dims="mn", use_psum_layout=False
) -> None:
    """d[g] = c[g] + a_g.T @ b_g, a_g and b_g the g-th group of rows: the MoE
    weight-gradient GEMM, grouped along K (the tokens).

    a: (float8_e4m3fn ``[sum_k, m]``, float32 ``[sum(ceil(k_g/gran_k)), m]``): one
        scale per column per ``gran_k`` rows of a group, each group starting a new
        scale row. b: likewise ``[sum_k, n]``.
    d: ``[num_groups, m, n]`` torch.float32; written.
    ks_cpu: the groups' sizes, back to back (each >= 0; DeepGEMM wants multiples of
        the alignment); with ``use_psum_layout`` optional (None or []): the groups are
        read from grouped_layout.
    grouped_layout: ``[num_groups]`` torch.int32: ks_cpu on the device (optional, checked
        where range checks run), or with ``use_psum_layout`` each group's end row
        (group g owns rows ``align(end[g-1]) <= r < end[g]``).
    c: optional ``[num_groups, m, n]`` torch.float32 added (may be d itself).
    recipe: (1, 1, gran_k).
    """
    check_options(compiled_dims)
    _, _, gran_k = check_granularity("recipe", recipe, 3)
    if tuple(recipe[:2]) != (1, 1):
        raise ValueError(f"recipe must be (1, 1, gran_k) for K-grouped GEMMs; got {tuple(recipe)}")
    values, _ = pair("a", a)
    check_tensor("a[0]", values, ndim=2)
    groups = k_groups("ks_cpu", ks_cpu, grouped_layout, values.shape[0], use_psum_layout)
    x, y = _k_grouped_operand("a", a, groups, gran_k), _k_grouped_operand("b", b, groups, gran_k)
    k_grouped(x, y, d, c, [count for _, count in groups])


def k_grouped_fp8_gemm_nt_contiguous(
    a, b, d, ks_cpu, grouped_layout=None, c=None, recipe=(1, 1, GROUP), compiled_dims="mn", use_psum_layout=False
) -> None:
    """d[g] = c[g] + a_g @ b_g.T with K-major groups (DeepGEMM's SM90 form): a holds
    ``sum_k * m`` float8_e4m3fn values, group g's ``[m, ks_cpu[g]]`` row-major block
    after the previous groups'; a's scales ``[m, sum(ceil(k_g/128))]``, one per row per
    128 of a group; b likewise with n. d, c, grouped_layout as for
    :func:`k_grouped_fp8_gemm_tn_contiguous`; recipe (1, 1, 128); no prefix sums.
    """
    check_options(compiled_dims)
    if tuple(check_granularity("recipe", recipe, 3)) != (1, 1, GROUP):
        raise ValueError(f"recipe must be (1, 1, 128) for K-major K-grouped GEMMs; got {tuple(recipe)}")
    if use_psum_layout:
        raise ValueError("use_psum_layout is not available for K-major K-grouped GEMMs (as in DeepGEMM)")
    (a_values, a_scales), (b_values, b_scales) = pair("a", a), pair("b", b)
    check_tensor("d", d, dtype=torch.float32, ndim=3)
    num_groups, m, n = d.shape
    for name, values, width in (("a", a_values, m), ("b", b_values, n)):
        check_tensor(f"{name}[0]", values, dtype=torch.float8_e4m3fn, contiguous=True)
    groups = k_groups("ks_cpu", ks_cpu, grouped_layout, a_values.numel() // max(m, 1), False)
    total = sum(count for _, count in groups)
    if a_values.numel() != total * m or b_values.numel() != total * n or len(groups) != num_groups:
        raise ValueError(f"a[0] and b[0] must hold sum(ks_cpu) * m and * n values for {num_groups} groups; got {a_values.numel()} and {b_values.numel()}")
    scale_columns = sum(ceil_div(count, GROUP) for _, count in groups)
    check_tensor("a[1]", a_scales, dtype=torch.float32, shape=(m, scale_columns), device=d.device)
    check_tensor("b[1]", b_scales, dtype=torch.float32, shape=(n, scale_columns), device=d.device)
    check_accumulator(c, d)
    a_flat, b_flat, scale_start = a_values.reshape(-1), b_values.reshape(-1), 0
    for group, (start, count) in enumerate(groups):
        scale_stop = scale_start + ceil_div(count, GROUP)
        x = Operand(a_flat[start * m : (start + count) * m].view(m, count), a_scales[:, scale_start:scale_stop])
        y = Operand(b_flat[start * n : (start + count) * n].view(n, count), b_scales[:, scale_start:scale_stop])
        dense(x, y, d[group], None if c is None else c[group])
        scale_start = scale_stop
