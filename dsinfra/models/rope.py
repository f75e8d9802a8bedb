"""Rotary position embeddings of a loaded checkpoint: plain RoPE or YaRN, as
transformers computes them for DeepSeek (:class:`Rotary`).

MLA rotates consecutive channel pairs ``(x0, x1), (x2, x3), ...`` (DeepSeek's
layout), or the two halves with
``rope_interleave`` false; V3.2's indexer always rotates halves. A query and
the keys it meets are rotated the same way, so where the rotated channels land
does not change their dot products.
"""

from __future__ import annotations

import math

import torch

from dsinfra.models.checkpoint_config import RopeConfig


def inverse_frequencies(rope: RopeConfig, dim: int) -> torch.Tensor:
    """[dim / 2] float32: the angle per position of each channel pair (YaRN
    blends interpolated and original frequencies over a ramp of pairs)."""
    base = rope.theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    if rope.type == "default":
        return 1.0 / base

    def correction_dim(rotations: float) -> float:
        return dim * math.log(rope.original_max_position_embeddings / (rotations * 2 * math.pi)) / (2 * math.log(rope.theta))

    low, high = correction_dim(rope.beta_fast), correction_dim(rope.beta_slow)
    if rope.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    interpolated_share = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    return (1.0 / (rope.factor * base)) * interpolated_share + (1.0 / base) * (1 - interpolated_share)


class Rotary:
    """The rotation of ``dim`` channels by position."""

    def __init__(self, rope: RopeConfig, dim: int, device: torch.device | str = "cpu"):
        self.inverse_frequencies = inverse_frequencies(rope, dim).to(device)
        self.factor = rope.cos_sin_factor()

    def angles(self, positions: torch.Tensor) -> torch.Tensor:
        """``factor * exp(i * position * frequency)`` for ``positions`` (int64, any
        shape): [*positions.shape, dim / 2] complex64 (YaRN's attention factor included)."""
        angles = positions.float().unsqueeze(-1) * self.inverse_frequencies
        return torch.polar(torch.full_like(angles, self.factor), angles)


def rotate(x: torch.Tensor, angles: torch.Tensor, *, interleaved: bool) -> torch.Tensor:
    """Rotate ``x [..., tokens, heads, dim]`` by its tokens' ``angles``
    ([..., tokens, dim / 2] complex, from :meth:`Rotary.angles`): consecutive
    channel pairs, or channel i with channel i + dim/2. Computed in float32,
    returned in x's dtype."""
    angles = angles.unsqueeze(-2)  # broadcast over heads
    if interleaved:
        rotated = torch.view_as_complex(x.float().contiguous().unflatten(-1, (-1, 2))) * angles
        return torch.view_as_real(rotated).flatten(-2).to(x.dtype)
    first, second = x.float().chunk(2, dim=-1)
    rotated = torch.complex(first, second) * angles
    return torch.cat((rotated.real, rotated.imag), dim=-1).to(x.dtype)
