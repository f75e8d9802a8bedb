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
"""

from __future__ import annotations

import torch

from dsinfra.validation import check_tensor

FP8_MAX = 448.0
GROUP = 128
_AMAX_FLOOR = 1e-4


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _pad_last(x: torch.Tensor, multiple: int) -> torch.Tensor:
    pad = -x.shape[-1] % multiple
    return torch.nn.functional.pad(x, (0, pad)) if pad else x


def per_token_cast_to_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x: [..., k] float -> (float8_e4m3fn [..., k], float32 scales [..., ceil(k/128)])."""
    check_tensor("x", x, dtype=(torch.float32, torch.bfloat16, torch.float16))
    if x.dim() < 1:
        raise ValueError("x must have at least one dimension")
    k = x.shape[-1]
    groups = _pad_last(x.float(), GROUP).unflatten(-1, (-1, GROUP))
    amax = groups.abs().amax(dim=-1).clamp(min=_AMAX_FLOOR)
    scales = amax / FP8_MAX
    x_fp8 = (groups / scales.unsqueeze(-1)).flatten(-2)[..., :k].to(torch.float8_e4m3fn)
    return x_fp8, scales


def per_token_cast_back(x_fp8: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The inverse of :func:`per_token_cast_to_fp8`: [..., k] in ``dtype``."""
    check_tensor("x_fp8", x_fp8, dtype=torch.float8_e4m3fn)
    k = x_fp8.shape[-1]
    check_tensor("scales", scales, dtype=torch.float32, shape=(*x_fp8.shape[:-1], _ceil_div(k, GROUP)))
    x = x_fp8.float() * scales.repeat_interleave(GROUP, dim=-1)[..., :k]
    return x.to(dtype)


def per_block_cast_to_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x: [n, k] float -> (float8_e4m3fn [n, k], float32 scales [ceil(n/128), ceil(k/128)])."""
    check_tensor("x", x, dtype=(torch.float32, torch.bfloat16, torch.float16), ndim=2)
    n, k = x.shape
    padded = _pad_last(_pad_last(x.float(), GROUP).t(), GROUP).t()  # [n_pad, k_pad]
    blocks = padded.unflatten(0, (-1, GROUP)).unflatten(2, (-1, GROUP))  # [nb, 128, kb, 128]
    amax = blocks.abs().amax(dim=(1, 3)).clamp(min=_AMAX_FLOOR)
    scales = amax / FP8_MAX
    x_fp8 = (blocks / scales[:, None, :, None]).flatten(2).flatten(0, 1)[:n, :k].to(torch.float8_e4m3fn).contiguous()
    return x_fp8, scales


def per_block_cast_back(x_fp8: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The inverse of :func:`per_block_cast_to_fp8`: [n, k] in ``dtype``."""
    check_tensor("x_fp8", x_fp8, dtype=torch.float8_e4m3fn, ndim=2)
    n, k = x_fp8.shape
    check_tensor("scales", scales, dtype=torch.float32, shape=(_ceil_div(n, GROUP), _ceil_div(k, GROUP)))
    expanded = scales.repeat_interleave(GROUP, dim=0)[:n].repeat_interleave(GROUP, dim=1)[:, :k]
    return (x_fp8.float() * expanded).to(dtype)
