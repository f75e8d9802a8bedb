"""The CPU path: FP8 GEMMs as bf16 (or float32) matmuls over dequantised operands.

The CPU has no FP8 matrix unit. Where its bf16 one is there (AMX, AVX-512 BF16:
:func:`dsinfra.backend.native_cpu_matmul`), each operand is dequantised into
bf16 (``x * scale``) and handed to ``torch.matmul``; elsewhere (AVX2 machines,
on which a bf16 matmul is a scalar loop hundreds of times slower) into float32.
The LHS is dequantised once per call, the RHS (the weight) one N-tile of at most
:data:`_TILE_ELEMENTS` at a time, so a large weight is never dequantised whole.
Both land in per-thread scratch memory that is reused between calls.

Dequantising. Eager PyTorch converts float8 to other dtypes one element at a time
on a CPU, so :func:`_dequantise` widens with integer ops instead
(:func:`dsinfra.fp8.fp8_bits_widened`: ``x * 2^-120`` in bf16 or float32, exactly).
One multiply by ``scale * 2^120`` then gives ``x * scale``. In bf16 that factor is
rounded and the product once more, so an operand carries a relative error of at
most 2^-7 (bf16 rounds to 2^-8), well below FP8's own 2^-4; in float32 only the
product rounds (2^-24). Scales of 2^7 or more would overflow the factor: such an
operand's scales are divided by a power of two first and the output is
multiplied back (exact).

Limits: FP8 NaN (``0x7f``, ``0xff``) reads as ±480·scale, not NaN; with bf16
matmuls a float32 output receives each product tile rounded to bf16 before ``c``
is added.
"""

from __future__ import annotations

import math
import threading

import torch

from dsinfra import backend
from dsinfra.deep_gemm import reference
from dsinfra.deep_gemm.utils import align, ceil_div, rhs_rows_per_scale
from dsinfra.fp8 import GROUP, REBIAS, fp8_bits_widened, fp8_to_float

_TILE_ELEMENTS = 1 << 23  # RHS elements dequantised at a time: 16 MiB of bf16
_LARGEST_SCALE_EXPONENT = 7  # scale < 2^7 keeps scale * 2^120 < 2^127, finite in bf16 and float32
_scratch = threading.local()  # per thread: the dequantised operands' memory, kept between calls
_BITS = {torch.bfloat16: torch.int16, torch.float32: torch.int32}  # the integers fp8_bits_widened fills


def _matmul_dtype() -> torch.dtype:
    """The dtype operands are dequantised into: bf16 where the CPU multiplies it
    natively, else float32."""
    return torch.bfloat16 if backend.native_cpu_matmul(torch.bfloat16) else torch.float32


def _factors(scales: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, int]:
    """(``scales * 2^(120 - e)`` in ``dtype``, e): the multipliers :func:`_dequantise`
    needs, with e = 0 unless a scale reaches 2^7, where the multipliers would
    overflow (the output is then multiplied by 2^e)."""
    exponent = 0
    if scales.numel():
        smallest, largest = scales.aminmax()
        largest = max(-float(smallest), float(largest))
        if math.isfinite(largest):
            exponent = max(0, math.frexp(largest)[1] - _LARGEST_SCALE_EXPONENT)
    return (scales * (REBIAS / 2.0**exponent)).to(dtype), exponent


def _buffer(purpose: str, rows: int, k: int, like: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """An integer ``[rows, align(k, 128)]`` buffer of ``dtype``'s width (int16 for
    bf16, int32 for float32) laid out like ``like`` (row- or column-major), zero
    past column k. Its memory is this thread's scratch for
    ``purpose``, reused across calls: fresh pages cost more to fault in (about
    0.25 ns a byte here) than the dequantisation that fills them."""
    width = align(k, GROUP)
    name = f"{purpose}_{_BITS[dtype]}"
    scratch = getattr(_scratch, name, None)
    if scratch is None or scratch.numel() < rows * width:
        scratch = torch.empty(rows * width, dtype=_BITS[dtype])
        setattr(_scratch, name, scratch)
    if like.stride(0) == 1 and like.stride(1) != 1:
        buffer = scratch[: rows * width].view(width, rows).T
    else:
        buffer = scratch[: rows * width].view(rows, width)
    if width > k:
        buffer[:, k:].zero_()
    return buffer


def _dequantise(x: torch.Tensor, factors: torch.Tensor, buffer: torch.Tensor) -> torch.Tensor:
    """x: [r, k] float8_e4m3fn, factors: [r, ceil(k/128)] from :func:`_factors`,
    buffer: [r, align(k, 128)] from :func:`_buffer` -> the buffer as the factors'
    dtype, holding ``x * scales`` (zero past column k)."""
    fp8_bits_widened(x, factors.dtype, out=buffer[:, : x.shape[1]])
    values = buffer.view(factors.dtype)
    values.unflatten(1, (-1, GROUP)).mul_(factors.unsqueeze(-1))
    return values


def fp8_gemm_nt(a, sa, b, sb, d, c) -> None:
    """d = c + (a * sa) @ (b * sb).T; see :func:`dsinfra.deep_gemm.fp8_gemm_nt`."""
    m, k = a.shape
    n = b.shape[0]
    if m == 0:
        return
    dtype = _matmul_dtype()
    lhs_factors, lhs_exponent = _factors(sa, dtype)
    lhs = _dequantise(a, lhs_factors, _buffer("lhs", m, k, a, dtype))
    rhs_factors, rhs_exponent = _factors(sb, dtype)
    rows_per_scale = rhs_rows_per_scale(sb, n)
    if rows_per_scale > 1:
        rhs_factors = rhs_factors.repeat_interleave(rows_per_scale, dim=0)  # one row of factors per RHS row
    output_factor = 2.0 ** (lhs_exponent + rhs_exponent)
    direct = c is None and output_factor == 1 and d.dtype == dtype
    tile = max(GROUP, _TILE_ELEMENTS // align(k, GROUP) // GROUP * GROUP)
    buffer = _buffer("rhs", min(tile, n), k, b, dtype)
    for start in range(0, n, tile):
        stop = min(start + tile, n)
        rhs = _dequantise(b[start:stop], rhs_factors[start:stop], buffer[: stop - start])
        if direct:
            torch.matmul(lhs, rhs.T, out=d[:, start:stop])
            continue
        product = lhs @ rhs.T
        if output_factor != 1:
            product.mul_(output_factor)
        if c is not None:
            torch.add(c[:, start:stop], product, out=d[:, start:stop])
        else:
            d[:, start:stop].copy_(product)


def m_grouped_fp8_gemm_nt_contiguous(a, sa, b, sb, d, m_indices) -> None:
    """One dense GEMM per run of equal ``m_indices`` (runs of -1 skipped)."""
    groups, counts = torch.unique_consecutive(m_indices, return_counts=True)
    start = 0
    for group, count in zip(groups.tolist(), counts.tolist()):
        if group >= 0:
            fp8_gemm_nt(a[start : start + count], sa[start : start + count], b[group], sb[group], d[start : start + count], None)
        start += count


def m_grouped_fp8_gemm_nt_masked(a, sa, b, sb, d, masked_m, expected_m) -> None:
    """One dense GEMM per group over its first ``masked_m[g]`` rows."""
    for group, rows in enumerate(masked_m.tolist()):
        fp8_gemm_nt(a[group, :rows], sa[group, :rows], b[group], sb[group], d[group, :rows], None)


def k_grouped_fp8_gemm_tn_contiguous(a, sa, b, sb, d, ks, c) -> None:
    """One dense GEMM per group over its run of ``ks[g]`` rows of ``a`` and ``b``."""
    start = scale_start = 0
    for group, k in enumerate(ks):
        scale_stop = scale_start + ceil_div(k, GROUP)
        if k > 0:
            lhs, lhs_scales = a[start : start + k].T, sa[scale_start:scale_stop].T
            rhs, rhs_scales = b[start : start + k].T, sb[scale_start:scale_stop].T
            fp8_gemm_nt(lhs, lhs_scales, rhs, rhs_scales, d[group], None if c is None else c[group])
        elif c is not None:
            d[group].copy_(c[group])
        else:
            d[group].zero_()
        start, scale_start = start + k, scale_stop


_SCORE_ELEMENTS = 1 << 22  # indexer scores held at a time: 16 MiB of float32


def _floats(x: torch.Tensor) -> torch.Tensor:
    """FP8 (widened by integer ops, exactly) or bf16 values as float32."""
    return fp8_to_float(x) if x.dtype == torch.float8_e4m3fn else x.float()


def _indexer_scores(q: torch.Tensor, keys: torch.Tensor, key_scales: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """q [rows, heads, d] and keys [n, d] in float32 -> [rows, n]: sum over heads of
    weights [rows, heads] * relu(q · k * key_scale), as one matmul and one bmm."""
    rows, heads, d = q.shape
    scores = (q.reshape(rows * heads, d) @ keys.T).mul_(key_scales).relu_()
    return torch.bmm(weights.unsqueeze(1), scores.view(rows, heads, -1)).squeeze(1)


def mqa_logits(q, kv, kv_scales, weights, ks, ke, clean_logits, max_seqlen_k, logits_dtype) -> torch.Tensor:
    """Queries in chunks of rows, each against the keys its rows see (from the
    smallest start to the largest end); entries no query sees stay -inf."""
    seq_len, num_heads, _ = q.shape
    seq_len_kv = kv.shape[0]
    out = torch.full((seq_len, max_seqlen_k or seq_len_kv), float("-inf"), dtype=logits_dtype, device=q.device)
    q, kv, weights = _floats(q), _floats(kv), weights.float()
    starts, ends = ks.tolist(), ke.tolist()
    chunk = max(1, _SCORE_ELEMENTS // (num_heads * max(seq_len_kv, 1)))
    for first in range(0, seq_len, chunk):
        rows = slice(first, min(first + chunk, seq_len))
        lo, hi = min(starts[rows]), max(ends[rows])
        if hi <= lo:
            continue
        logits = _indexer_scores(q[rows], kv[lo:hi], kv_scales[lo:hi], weights[rows])
        row_starts, row_ends = ks[rows, None].long(), ke[rows, None].long()
        if max_seqlen_k:  # column j scores key ks[i] + j
            columns = torch.arange(max_seqlen_k, device=q.device)
            index = (row_starts - lo + columns).clamp(0, hi - lo - 1)
            out[rows] = logits.gather(1, index).masked_fill_(columns >= row_ends - row_starts, float("-inf"))
        else:
            keys = torch.arange(lo, hi, device=q.device)
            out[rows, lo:hi] = logits.masked_fill_((keys < row_starts) | (keys >= row_ends), float("-inf"))
    return out


def paged_mqa_logits(q, kv, kv_scales, weights, visible, block_table, max_context_len, clean_logits, logits_dtype) -> torch.Tensor:
    """One sequence at a time: its next_n queries against its keys, gathered from
    the cache blocks its table names; entries past a query's keys stay -inf."""
    batch_size, next_n, num_heads, _ = q.shape
    block_kv = kv.shape[1]
    out = torch.full((batch_size * next_n, max_context_len), float("-inf"), dtype=logits_dtype, device=q.device)
    counts = visible.view(batch_size, next_n)
    longest = counts.amax(dim=1).tolist() if next_n else [0] * batch_size
    q, weights = _floats(q), weights.float().view(batch_size, next_n, num_heads)
    for sequence, length in enumerate(longest):
        if length <= 0:
            continue
        blocks = block_table[sequence, : ceil_div(length, block_kv)].long()
        keys = _floats(kv[blocks].flatten(0, 1)[:length])
        key_scales = kv_scales[blocks].flatten()[:length]
        logits = _indexer_scores(q[sequence], keys, key_scales, weights[sequence])
        positions = torch.arange(length, device=q.device)
        rows = slice(sequence * next_n, (sequence + 1) * next_n)
        out[rows, :length] = logits.masked_fill_(positions >= counts[sequence, :, None], float("-inf"))
    return out


def bf16_gemm_nt(a, b, d, c) -> None:
    """bfloat16 operands into a bfloat16 output with nothing to add, on a CPU that
    multiplies bf16 natively: one bf16 matmul (float32 accumulation inside, one
    rounding); anything else in float32."""
    if c is None and a.dtype == b.dtype == d.dtype == torch.bfloat16 and backend.native_cpu_matmul(torch.bfloat16):
        d.copy_(a @ b.T)
    else:
        reference.bf16_gemm_nt(a, b, d, c)
