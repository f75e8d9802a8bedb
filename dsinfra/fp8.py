"""FP8 (float8_e4m3fn) casts with DeepSeek-V3's fine-grained scaling.

Two granularities, as DeepGEMM and DeepEP use them:

- per token: each row of ``x [m, k]`` gets one float32 scale per 128 channels,
  ``scales [m, ceil(k/128)]`` (activations, gradients, dispatched tokens);
- per block: each 128x128 block of ``x [n, k]`` gets one scale,
  ``scales [ceil(n/128), ceil(k/128)]`` (weights).

A scale is ``amax / 448`` of its group (448 is float8_e4m3fn's largest finite
value), with amax floored at 1e-4 so an all-zero group stays finite, and
``x ≈ x_fp8.float() * scale``. A last group narrower than 128 (k or n not a
multiple of 128) is scaled by its own amax.

Widening FP8 on a CPU. Eager PyTorch converts float8 to wider dtypes one
element at a time there (about 2 ns an element, slower than a bf16 matmul
reads its operands), so :func:`fp8_bits_widened` does it with vectorised
integer ops, and :func:`fp8_to_float` and the cast-backs build on it. The
results are exactly those of ``x.float()``.
"""

from __future__ import annotations

import math

import torch

from dsinfra.validation import check_tensor

FP8_MAX = 448.0
GROUP = 128
_AMAX_FLOOR = 1e-4
_CHUNK_BYTES = 1 << 20  # float32 work space per step of a cast on a CPU
REBIAS = 2.0**120  # float8_e4m3fn's exponent bias is 7, bfloat16's and float32's 127
# dtype -> (integer dtype of its width, shift that moves a byte's eeee mmm to the top of the
# exponent and mantissa fields, mask of those 7 bits and the sign bit: 0x87f0 and 0x87f00000)
_WIDENING = {torch.bfloat16: (torch.int16, 4, -0x7810), torch.float32: (torch.int32, 20, -0x78100000)}


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _pad_last(x: torch.Tensor, multiple: int) -> torch.Tensor:
    pad = -x.shape[-1] % multiple
    return torch.nn.functional.pad(x, (0, pad)) if pad else x


def fp8_bits_widened(x: torch.Tensor, dtype: torch.dtype, out: torch.Tensor | None = None) -> torch.Tensor:
    """``x * 2**-120`` in ``dtype`` (torch.bfloat16 or torch.float32), exactly, by integer ops.

    x: float8_e4m3fn, any shape and strides. Each byte ``s eeee mmm``, sign-extended
    to the width of ``dtype``, shifted so that ``eeee mmm`` lands at the top of the
    exponent and mantissa fields, and masked to those bits and the sign, is the bit
    pattern of ``x * 2**-120``: the exponent biases differ by 120, and FP8
    subnormals land on subnormals. NaN (``0x7f``, ``0xff``) reads as ±480 · 2**-120.
    out: an int16 (bfloat16) or int32 (float32) tensor of x's shape to fill, else allocated.
    Returns ``out`` viewed as ``dtype``.
    """
    check_tensor("x", x, dtype=torch.float8_e4m3fn)
    if dtype not in _WIDENING:
        raise TypeError(f"dtype must be torch.bfloat16 or torch.float32; got {dtype}")
    integer, shift, mask = _WIDENING[dtype]
    if out is None:
        out = torch.empty(x.shape, dtype=integer, device=x.device)
    check_tensor("out", out, dtype=integer, shape=tuple(x.shape), device=x.device)
    out.copy_(x.view(torch.int8))  # sign-extends
    out.mul_(1 << shift).bitwise_and_(mask)
    return out.view(dtype)


def fp8_to_float(x: torch.Tensor) -> torch.Tensor:
    """``x.float()`` for float8_e4m3fn x, bit for bit, NaN included; on a CPU several
    times faster than ``x.float()`` (through :func:`fp8_bits_widened`)."""
    check_tensor("x", x, dtype=torch.float8_e4m3fn)
    if x.device.type != "cpu":
        return x.float()
    values = fp8_bits_widened(x, torch.float32).mul_(REBIAS)  # exact: a power of two
    if values.numel():
        smallest, largest = values.aminmax()
        if max(-float(smallest), float(largest)) > FP8_MAX:  # only NaN bytes read as ±480
            values.masked_fill_(values.abs() == 480.0, float("nan"))
    return values


def _row_chunks(rows: int, row_bytes: int, device: torch.device, multiple: int = 1) -> list[slice]:
    """Slices of ``rows`` whose float32 work space is about 1 MiB on a CPU (one slice
    elsewhere), each a multiple of ``multiple`` rows but the last. Small temporaries
    stay in cache, and stay below the size from which malloc maps fresh pages on
    every call (page faults cost more than the casts)."""
    if device.type != "cpu":
        return [slice(0, rows)]
    step = max(1, _CHUNK_BYTES // max(row_bytes, 1) // multiple) * multiple
    return [slice(start, min(start + step, rows)) for start in range(0, rows, step)]


def _scale_groups_(x: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Multiply x [..., k] in place by scales [..., ceil(k/128)], one per 128 channels."""
    k = x.shape[-1]
    full = k // GROUP * GROUP
    x[..., :full].unflatten(-1, (-1, GROUP)).mul_(scales[..., : full // GROUP, None])
    if full < k:
        x[..., full:].mul_(scales[..., -1:])
    return x


def per_token_cast_to_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x: [..., k] float -> (float8_e4m3fn [..., k], float32 scales [..., ceil(k/128)])."""
    check_tensor("x", x, dtype=(torch.float32, torch.bfloat16, torch.float16))
    if x.dim() < 1:
        raise ValueError("x must have at least one dimension")
    k = x.shape[-1]
    rows = x.reshape(math.prod(x.shape[:-1]), k)
    x_fp8 = torch.empty(rows.shape, dtype=torch.float8_e4m3fn, device=x.device)
    scales = torch.empty(rows.shape[0], _ceil_div(k, GROUP), dtype=torch.float32, device=x.device)
    for chunk in _row_chunks(rows.shape[0], 4 * k, x.device):
        groups = _pad_last(rows[chunk].float(), GROUP).unflatten(-1, (-1, GROUP))
        amax = groups.abs().amax(dim=-1).clamp_(min=_AMAX_FLOOR)
        scales[chunk] = amax / FP8_MAX
        x_fp8[chunk] = (groups / scales[chunk, :, None]).flatten(-2)[:, :k]
    return x_fp8.view(x.shape), scales.view(*x.shape[:-1], scales.shape[1])


def _cast_back_rows(x_fp8: torch.Tensor, row_scales: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out [rows, k] = x_fp8 [rows, k] times row_scales [rows, ceil(k/128)], computed in float32 and rounded once."""
    for chunk in _row_chunks(x_fp8.shape[0], 4 * x_fp8.shape[1], x_fp8.device):
        out[chunk] = _scale_groups_(fp8_to_float(x_fp8[chunk]), row_scales[chunk])
    return out


def per_token_cast_back(
    x_fp8: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.float32, out: torch.Tensor | None = None
) -> torch.Tensor:
    """The inverse of :func:`per_token_cast_to_fp8`: [..., k] in ``dtype``.

    out: where to write it (x_fp8's shape, ``dtype``, viewable as [-1, k], as a slice
    of the last dimension of a contiguous tensor is), else allocated."""
    check_tensor("x_fp8", x_fp8, dtype=torch.float8_e4m3fn)
    k = x_fp8.shape[-1]
    check_tensor("scales", scales, dtype=torch.float32, shape=(*x_fp8.shape[:-1], _ceil_div(k, GROUP)))
    if out is None:
        out = torch.empty(x_fp8.shape, dtype=dtype, device=x_fp8.device)
    check_tensor("out", out, dtype=dtype, shape=tuple(x_fp8.shape), device=x_fp8.device)
    rows = math.prod(x_fp8.shape[:-1])
    _cast_back_rows(x_fp8.reshape(rows, k), scales.reshape(rows, scales.shape[-1]), out.view(rows, k))
    return out


def per_block_cast_to_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x: [n, k] float -> (float8_e4m3fn [n, k], float32 scales [ceil(n/128), ceil(k/128)])."""
    check_tensor("x", x, dtype=(torch.float32, torch.bfloat16, torch.float16), ndim=2)
    n, k = x.shape
    x_fp8 = torch.empty(n, k, dtype=torch.float8_e4m3fn, device=x.device)
    scales = torch.empty(_ceil_div(n, GROUP), _ceil_div(k, GROUP), dtype=torch.float32, device=x.device)
    for chunk in _row_chunks(n, 4 * k, x.device, multiple=GROUP):
        padded = _pad_last(_pad_last(x[chunk].float(), GROUP).t(), GROUP).t()  # [rows padded, k padded]
        blocks = padded.unflatten(0, (-1, GROUP)).unflatten(2, (-1, GROUP))  # [row blocks, 128, kb, 128]
        block_rows = slice(chunk.start // GROUP, chunk.start // GROUP + blocks.shape[0])
        amax = blocks.abs().amax(dim=(1, 3)).clamp_(min=_AMAX_FLOOR)
        scales[block_rows] = amax / FP8_MAX
        x_fp8[chunk] = (blocks / scales[block_rows, None, :, None]).flatten(2).flatten(0, 1)[: chunk.stop - chunk.start, :k]
    return x_fp8, scales


def per_block_cast_back(x_fp8: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The inverse of :func:`per_block_cast_to_fp8`: [n, k] in ``dtype``."""
    check_tensor("x_fp8", x_fp8, dtype=torch.float8_e4m3fn, ndim=2)
    n, k = x_fp8.shape
    check_tensor("scales", scales, dtype=torch.float32, shape=(_ceil_div(n, GROUP), _ceil_div(k, GROUP)))
    out = torch.empty(n, k, dtype=dtype, device=x_fp8.device)
    return _cast_back_rows(x_fp8, scales.repeat_interleave(GROUP, dim=0)[:n], out)
