"""Tokens as byte rows: each token's fields (hidden vector, FP8 scales, top-k
indices and weights, ...) concatenated into one ``uint8`` row, so a transfer is
one collective whatever travels, and FP8 travels as bytes (gloo refuses float8
dtypes)."""

from __future__ import annotations

import math

import torch


def row_width(t: torch.Tensor) -> int:
    """Bytes per row of ``t [n, ...]``."""
    return math.prod(t.shape[1:]) * t.element_size()


def _bytes(t: torch.Tensor) -> torch.Tensor:
    """``t [n, ...]`` contiguous -> its bytes, ``uint8 [n, row_width(t)]``."""
    return t.view(torch.uint8).reshape(t.shape[0], row_width(t))


class RowFormat:
    """The layout of a row: fields of ``[n, *shape]`` tensors side by side.

    Built from example tensors (their dtypes and per-row shapes count, not
    their number of rows).
    """

    def __init__(self, fields: list[torch.Tensor]):
        self.dtypes = [f.dtype for f in fields]
        self.shapes = [tuple(f.shape[1:]) for f in fields]
        self.widths = [row_width(f) for f in fields]
        self.offsets = [sum(self.widths[:i]) for i in range(len(fields))]
        self.row_bytes = sum(self.widths)

    def pack(self, fields: list[torch.Tensor], index: torch.Tensor | None = None) -> torch.Tensor:
        """The rows ``index`` (all rows when None) of ``fields`` -> ``uint8 [len(index), row_bytes]``."""
        pieces = [_bytes(f.contiguous()) for f in fields]
        if index is not None:
            pieces = [p.index_select(0, index) for p in pieces]
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=1)

    def empty(self, num_rows: int, device: torch.device) -> list[torch.Tensor]:
        """Uninitialised field tensors for ``num_rows`` rows."""
        return [torch.empty((num_rows, *shape), dtype=dtype, device=device) for dtype, shape in zip(self.dtypes, self.shapes)]

    def receive_buffer(self, outputs: list[torch.Tensor]) -> torch.Tensor:
        """Where rows for ``outputs`` arrive: the bytes of the output itself when
        there is a single field (nothing to unpack then), else a new
        ``uint8 [n, row_bytes]``."""
        if len(outputs) == 1:
            return _bytes(outputs[0])
        return torch.empty((outputs[0].shape[0], self.row_bytes), dtype=torch.uint8, device=outputs[0].device)

    def unpack_into(
        self,
        rows: torch.Tensor,
        outputs: list[torch.Tensor],
        index: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
    ) -> None:
        """Copy the fields of ``rows`` into ``outputs``: row i to output row i;
        with ``index``, output row i gets row ``index[i]``; with ``positions``
        too, output row ``positions[i]`` gets row ``index[i]`` and the other
        output rows are left as they are."""
        if index is None and len(outputs) == 1 and rows.data_ptr() == outputs[0].data_ptr():
            return  # received in place (receive_buffer)
        for out, offset, width in zip(outputs, self.offsets, self.widths):
            target = _bytes(out)
            field = rows[:, offset : offset + width]
            if index is None:
                target.copy_(field)
            elif positions is None:
                torch.index_select(field, 0, index, out=target)
            else:
                target.index_copy_(0, positions, field.index_select(0, index))

    def unpack(self, rows: torch.Tensor) -> list[torch.Tensor]:
        """The fields of ``rows``: views when there is a single field, else copies."""
        if len(self.widths) == 1:
            return [rows.view(self.dtypes[0]).view(rows.shape[0], *self.shapes[0])]
        outputs = self.empty(rows.shape[0], rows.device)
        self.unpack_into(rows, outputs)
        return outputs

