"""UE8M0 scales: powers of two stored as their 8-bit exponent, as DeepGEMM's
Blackwell (SM100) kernels read them.

A UE8M0 byte ``e`` stands for ``2^(e - 127)``: a float32's exponent field with
no sign and no mantissa. Four such bytes pack into one int32 (the first scale in
the lowest byte), so a float32 scale tensor ``[..., 4n]`` of powers of two packs
into an int32 tensor ``[..., n]``. Every conversion here is exact.
"""

from __future__ import annotations

import torch

from dsinfra.validation import check_tensor

_EXPONENT_SHIFT = 23  # float32: 23 mantissa bits below the 8 exponent bits
_MANTISSA_MASK = (1 << _EXPONENT_SHIFT) - 1
_SCALES_PER_INT = 4


def ceil_to_ue8m0(x: torch.Tensor) -> torch.Tensor:
    """The smallest power of two >= ``|x|``, elementwise, as float32 (2^-126 for
    zero, at most 2^127): how a UE8M0 scale rounds a float32 one, up, so that
    values divided by it stay in range."""
    check_tensor("x", x, dtype=(torch.float32, torch.bfloat16, torch.float16))
    bits = x.abs().float().view(torch.int32)
    exponent = (bits >> _EXPONENT_SHIFT) + (bits & _MANTISSA_MASK).ne(0).to(torch.int32)
    return (exponent.clamp(1, 254) << _EXPONENT_SHIFT).view(torch.float32)


def pack_ue8m0_to_int(x: torch.Tensor) -> torch.Tensor:
    """x: [..., 4n] torch.float32 powers of two (or zeros, byte 0) -> [..., n]
    torch.int32, four UE8M0 bytes each, the first scale in the lowest byte."""
    check_tensor("x", x, dtype=torch.float32)
    if x.dim() == 0 or x.shape[-1] % _SCALES_PER_INT:
        raise ValueError(f"x must have a last dimension that is a multiple of 4; got shape {list(x.shape)}")
    bits = x.reshape(-1).view(torch.int32).view(x.shape)
    if x.numel() and (bits.lt(0).any() or (bits & _MANTISSA_MASK).any()):
        raise ValueError("x must hold powers of two or zeros (UE8M0 values, e.g. from ceil_to_ue8m0)")
    return (bits >> _EXPONENT_SHIFT).to(torch.uint8).view(torch.int32)


def unpack_ue8m0_from_int(packed: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`pack_ue8m0_to_int`: [..., n] torch.int32 -> [..., 4n] torch.float32."""
    check_tensor("packed", packed, dtype=torch.int32)
    if packed.dim() == 0:
        raise ValueError("packed must have at least one dimension")
    exponents = packed.reshape(-1).view(torch.uint8).view(*packed.shape[:-1], -1).to(torch.int32)
    return (exponents << _EXPONENT_SHIFT).view(torch.float32)
