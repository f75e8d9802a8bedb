"""Argument checks shared by every public function.

Each check raises TypeError (wrong kind of thing or dtype) or ValueError (wrong
shape, device or value) with a message that names the argument, says what was
expected and what came. Checks that need a device sync (index ranges) run only
where :func:`dsinfra.backend.range_checks_enabled` says so.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from dsinfra import backend

Dims = Sequence["int | str | None"]


def _dtype_names(dtypes: Sequence[torch.dtype]) -> str:
    return " or ".join(str(d).replace("torch.", "") for d in dtypes)


def check_tensor(
    name: str,
    value: object,
    *,
    dtype: torch.dtype | Sequence[torch.dtype] | None = None,
    ndim: int | None = None,
    shape: Dims | None = None,
    device: torch.device | str | None = None,
    contiguous: bool = False,
) -> torch.Tensor:
    """Check that ``value`` is a tensor as described and return it.

    ``shape`` lists the expected sizes; ``None`` accepts any size and a string
    names the size in the message (``("batch", 576)``), also accepting any.
    ``ndim`` defaults to ``len(shape)``.
    """
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor; got {type(value).__name__}")
    if dtype is not None:
        dtypes = (dtype,) if isinstance(dtype, torch.dtype) else tuple(dtype)
        if value.dtype not in dtypes:
            raise TypeError(f"{name} must have dtype {_dtype_names(dtypes)}; got {_dtype_names((value.dtype,))}")
    if shape is not None and ndim is None:
        ndim = len(shape)
    if ndim is not None and value.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions; got shape {list(value.shape)}")
    if shape is not None:
        for axis, (want, got) in enumerate(zip(shape, value.shape)):
            if isinstance(want, int) and want != got:
                described = "[" + ", ".join(str(s) if s is not None else "*" for s in shape) + "]"
                raise ValueError(
                    f"{name} must have shape {described}; got {list(value.shape)} (dimension {axis} is {got}, expected {want})"
                )
    if device is not None and value.device != torch.device(device):
        raise ValueError(f"{name} must be on {torch.device(device)} like the other inputs; got {value.device}")
    if contiguous and not value.is_contiguous():
        raise ValueError(f"{name} must be contiguous")
    return value


def check_range(name: str, value: torch.Tensor, low: int, high: int, *, ignore: int | None = None) -> None:
    """Check that every entry of the integer tensor ``value`` lies in ``[low, high)``,
    entries equal to ``ignore`` (e.g. -1 for "none") aside.

    Needs a device sync, so it runs only where range checks are enabled.
    """
    if value.numel() == 0 or not backend.range_checks_enabled(value.device):
        return
    if ignore is not None:  # ignored entries count as ``low``
        value = torch.where(value == ignore, low, value)
    smallest, largest = (int(bound) for bound in torch.aminmax(value))
    if smallest < low or largest >= high:
        allowed = f"[{low}, {high})" + (f" or {ignore}" if ignore is not None else "")
        bad = smallest if smallest < low else largest
        raise ValueError(f"{name} must hold values in {allowed}; found {bad}")


def check_positive(name: str, value: object, *, allow_zero: bool = False) -> int:
    """Check that ``value`` is an int greater than zero (or at least zero) and return it."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int; got {type(value).__name__}")
    if value < 0 or (value == 0 and not allow_zero):
        raise ValueError(f"{name} must be {'>= 0' if allow_zero else '> 0'}; got {value}")
    return value


def check_divisible(name: str, value: int, divisor: int, divisor_name: str) -> None:
    """Check that ``divisor`` divides ``value``."""
    if divisor <= 0 or value % divisor:
        raise ValueError(f"{name} ({value}) must be divisible by {divisor_name} ({divisor})")
