"""An owner's per-row view of the elements each group holds in its piece of a tensor.

Placing or picking held elements one row (or one column) at a time, not one index per element, is what
keeps an owner's cost per bucket bounded by the rows of its piece; `HeldGroups.piece_rows` builds these.
"""

from __future__ import annotations

import dataclasses
import functools

import torch


def _whole_rows(values: torch.Tensor, rows: int, width: int, skip: int) -> torch.Tensor:
    """(rows, width): `values` placed `skip` elements into whole rows, zeros around; a view where they fit."""
    if skip == 0 and len(values) == rows * width:
        return values.view(rows, width)
    padded = values.new_zeros(rows * width)
    padded[skip : skip + len(values)] = values
    return padded.view(rows, width)


@dataclasses.dataclass(frozen=True)
class PieceRows:
    """The held rows of one flat range of a full tensor (a row: one unit-axis coordinate of one outer
    index, `inner` contiguous elements), every group's after the previous one's: what an owner needs to
    place or pick each group's held elements of its piece, at a cost per row, not per element.

    The range's first row may start `skip` elements before it and its last end `tail` after it: those
    rows are padded to whole rows while they are placed or picked."""

    inner: int
    skip: int
    length: int
    rows: torch.Tensor  # (H,) each group's held rows, counted from the first one the range touches
    counts: torch.Tensor  # (G,) each group's held elements of the range
    holders: torch.Tensor  # (touched rows,) how many groups hold each row

    @property
    def tail(self) -> int:
        return len(self.holders) * self.inner - self.skip - self.length

    @property
    def holder_counts(self) -> torch.Tensor:
        """`holders` shaped to divide what `padded` gives."""
        return self.holders[:, None]

    @functools.cached_property
    def _real(self) -> torch.Tensor | None:
        """(H, inner) bool: which elements of the held rows lie inside the range; None where all do. Made once
        for a weight and its moments, which share the rows."""
        if self.skip == 0 and self.tail == 0:
            return None
        real = torch.ones(len(self.rows), self.inner, dtype=torch.bool)
        real[self.rows == 0, : self.skip] = False
        real[self.rows == len(self.holders) - 1, self.inner - self.tail :] = False
        return real

    def padded(self, values: torch.Tensor) -> torch.Tensor:
        """(touched rows, inner): the range's `values` as whole rows; a view of them where the range is."""
        return _whole_rows(values, len(self.holders), self.inner, self.skip)

    def unpadded(self, rows: torch.Tensor) -> torch.Tensor:
        """The inverse of `padded`: the range's elements of whole rows (a view)."""
        return rows.flatten()[self.skip : self.skip + self.length]

    def select(self, values: torch.Tensor) -> torch.Tensor:
        """Each group's held elements of the range's `values`, group after group, in flat order."""
        held = self.padded(values).index_select(0, self.rows)
        real = self._real
        return held.flatten() if real is None else held[real]

    def add_to(self, rows: torch.Tensor, held: torch.Tensor) -> None:
        """Adds `held` (laid out as `select` gives it) to whole `rows` (as `padded` gives them)."""
        real = self._real
        if real is None:
            spread = held.view(len(self.rows), self.inner)
        else:
            spread = held.new_zeros(len(self.rows), self.inner)
            spread[real] = held
        rows.index_add_(0, self.rows, spread)


@dataclasses.dataclass(frozen=True)
class PieceColumns:
    """`PieceRows` for a tensor whose unit axis is its last (o_proj, down_proj): a flat range padded to whole
    outer rows of `size` elements, in each of which a group holds the same columns. Each group's held
    elements, group after group in flat order, are its columns of every row: picked and placed through one
    column index (`columns`, all groups', built once per tensor) instead of one index per element."""

    size: int
    skip: int
    length: int
    columns: torch.Tensor  # (C,) every group's held columns, group after group
    ends: list[int]  # group g's columns are columns[ends[g]:ends[g + 1]]
    counts: torch.Tensor  # (G,) each group's held elements of the range
    holders: torch.Tensor  # (size,) how many groups hold each column

    @property
    def outer(self) -> int:
        return -(-(self.skip + self.length) // self.size)

    @property
    def tail(self) -> int:
        return self.outer * self.size - self.skip - self.length

    @property
    def holder_counts(self) -> torch.Tensor:
        return self.holders[None, :]

    def padded(self, values: torch.Tensor) -> torch.Tensor:
        """(outer rows, size): the range's `values` as whole rows; a view of them where the range is."""
        return _whole_rows(values, self.outer, self.size, self.skip)

    def unpadded(self, rows: torch.Tensor) -> torch.Tensor:
        return rows.flatten()[self.skip : self.skip + self.length]

    @property
    def _widths(self) -> list[int]:
        """Each group's number of held columns."""
        return [b - a for a, b in zip(self.ends[:-1], self.ends[1:], strict=True)]

    def _group_major(self, by_row: torch.Tensor) -> torch.Tensor:
        """(outer, C) laid out row by row -> flat, group after group (each group's columns of every row)."""
        widths = self._widths
        if len(set(widths)) == 1:  # equal keep ratios: one transposing copy
            return by_row.view(self.outer, len(widths), widths[0]).transpose(0, 1).reshape(-1)
        return torch.cat([block.reshape(-1) for block in by_row.split(widths, 1)])

    def _by_row(self, group_major: torch.Tensor) -> torch.Tensor:
        """The inverse of `_group_major`."""
        widths = self._widths
        if len(set(widths)) == 1:
            return group_major.view(len(widths), self.outer, widths[0]).transpose(0, 1).reshape(self.outer, -1)
        blocks = group_major.split([self.outer * w for w in widths])
        return torch.cat([block.view(self.outer, w) for block, w in zip(blocks, widths, strict=True)], 1)

    @functools.cached_property
    def _real(self) -> torch.Tensor | None:
        """Which of `_group_major`'s elements lie inside the range; None where all do."""
        if self.skip == 0 and self.tail == 0:
            return None
        real = torch.ones(self.outer, len(self.columns), dtype=torch.bool)
        real[0] &= self.columns >= self.skip
        real[-1] &= self.columns < self.size - self.tail
        return self._group_major(real)

    def select(self, values: torch.Tensor) -> torch.Tensor:
        held = self._group_major(self.padded(values).index_select(1, self.columns))
        real = self._real
        return held if real is None else held[real]

    def add_to(self, rows: torch.Tensor, held: torch.Tensor) -> None:
        real = self._real
        if real is not None:
            spread = held.new_zeros(len(real))
            spread[real] = held
            held = spread
        rows.index_add_(1, self.columns, self._by_row(held))
