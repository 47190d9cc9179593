"""Which elements of a full tensor each group holds, for every group at once: index arithmetic on tensors.

Unit ids are ascending in a spec, so a subnet tensor lists its elements in the order of their flat index
in the full tensor. A group's elements inside any flat range [lo, hi) of a full tensor are therefore one
contiguous run of its flattened subnet, whose ends are counted from a prefix sum over the unit axis
(`HeldGroups.before`, any number of positions, every group, one tensor expression); only the owner of a
piece needs to place or pick the held elements, and it does so per row of its piece (`PieceRows`).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import torch

from twist_scale.models import AxisSlice, UnitBlock


def unit_masks(unit_block: UnitBlock, kept: list[torch.Tensor]) -> torch.Tensor:
    """(G, n) bool: which units of `unit_block` each group keeps (`kept[g]`: its unit ids)."""
    masks = torch.zeros(len(kept), unit_block.num_units, dtype=torch.bool)
    rows = torch.repeat_interleave(torch.arange(len(kept)), torch.tensor([len(ids) for ids in kept]))
    masks[rows, torch.cat(kept)] = True
    return masks


def input_channels(flat: torch.Tensor, shape: torch.Size, axis: int) -> torch.Tensor:
    """The input channel of an output projection that each flat index of its weight belongs to: the column of
    an (outputs, channels) weight (`axis` 1), the row of a (channels, outputs) one (`axis` 0)."""
    return flat % shape[1] if axis == 1 else torch.div(flat, shape[1], rounding_mode="floor")


def exclusive_cumsum(lengths: torch.Tensor) -> torch.Tensor:
    """Where each of `lengths` (any shape, row-major) starts in their concatenation."""
    flat = lengths.flatten()
    return (torch.cumsum(flat, 0) - flat).view(lengths.shape)


def expand_ranges(starts: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """The concatenation of arange(start, start + length) over the pairs, in one tensor expression:
    ones, with each range's first step jumping to its start, summed up."""
    lengths, starts = lengths.flatten(), starts.flatten()
    keep = lengths > 0
    lengths, starts = lengths[keep], starts[keep]
    total = int(lengths.sum())
    if total == 0:
        return torch.empty(0, dtype=torch.long)
    steps = torch.ones(total, dtype=torch.long)
    ends = starts + lengths - 1  # the last index of each range
    steps[exclusive_cumsum(lengths)] = starts - torch.cat([torch.tensor([0]), ends[:-1]])
    return torch.cumsum(steps, 0)


SLICE_AT = 256  # ranges this long on average are copied slice by slice: cheaper than an index per element


def take(source: torch.Tensor, starts: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """`source` at the concatenated ranges; `source` itself (no copy) where they are all of it, in order,
    as they are when a bucket holds one tensor. Long ranges (a small world, large tensors) are copied
    slice by slice; many short ones through one index of every element."""
    lengths, starts = lengths.flatten(), starts.flatten()
    keep = lengths > 0
    lengths, starts = lengths[keep], starts[keep]
    if torch.equal(starts, exclusive_cumsum(lengths)) and int(lengths.sum()) == len(source):
        return source
    if len(lengths) * SLICE_AT <= int(lengths.sum()):
        pieces = [source[a : a + n] for a, n in zip(starts.tolist(), lengths.tolist(), strict=True)]
        return torch.cat(pieces) if pieces else source[:0]
    return source.index_select(0, expand_ranges(starts, lengths).to(source.device))


def gather_runs(sources: list[torch.Tensor], starts: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """One payload, rank after rank, of the runs [starts[r, i], + lengths[r, i]) of each `sources[i]`:
    `sources[0]` itself when it is all of one source in order, its slices when the runs are long, else
    one index over the sources' concatenation."""
    if len(sources) == 1:
        return take(sources[0], starts, lengths)
    flat_lengths = lengths.flatten()
    if len(flat_lengths) * SLICE_AT <= int(flat_lengths.sum()):
        rows = (flat_lengths > 0).nonzero(as_tuple=True)[0]
        cols = rows % lengths.shape[1]
        runs = zip(cols.tolist(), starts.flatten()[rows].tolist(), flat_lengths[rows].tolist(), strict=True)
        return torch.cat([sources[i][a : a + n] for i, a, n in runs])
    offsets = torch.tensor([0] + [len(t) for t in sources[:-1]]).cumsum(0)
    return take(torch.cat(sources), starts + offsets, lengths)


class HeldGroups:
    """For each of G groups, the elements of one full tensor it holds: those whose unit-axis coordinate it
    keeps (every element where the tensor is not unit-owned or the group holds it whole)."""

    def __init__(
        self,
        shape: torch.Size,
        unit: tuple[UnitBlock, AxisSlice] | None,
        masks: torch.Tensor | None,
        groups: int,
        layout: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> None:
        """`layout`: `HeldGroups.layout` of these masks, where another tensor of the block already made it."""
        self.groups, self.numel = groups, math.prod(shape)
        self.along: torch.Tensor | None = None  # (G, size) bool over the unit axis; None: every element
        if unit is None or masks is None:
            return
        self.size, self.inner = shape[unit[1].axis], math.prod(shape[unit[1].axis + 1 :])
        self.along, self.below = layout or self.layout(unit, masks, self.size)

    @staticmethod
    def layout(unit: tuple[UnitBlock, AxisSlice], masks: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(G, size) bool: which unit-axis coordinates each group holds, and (G, size + 1) their prefix sums.
        The same for every tensor of a unit block whose unit axis is laid out alike (gate and up, q and o)."""
        axis = unit[1]
        if not axis.segments and unit[0].num_units * axis.width == size:  # unit u owns [u*width, (u+1)*width)
            along = masks if axis.width == 1 else axis.spread(masks)
        else:
            channels = axis.index(torch.arange(unit[0].num_units))
            if len(channels) > 1 and not bool((channels[1:] > channels[:-1]).all()):
                raise ValueError(f"{axis.name}: the packed exchange needs a unit axis laid out in ascending unit order")
            along = torch.zeros(len(masks), size, dtype=torch.bool)
            along[:, channels] = axis.spread(masks)
        below = torch.zeros(len(masks), size + 1, dtype=torch.int32)  # int32: a unit axis is far below 2**31
        torch.cumsum(along, 1, dtype=torch.int32, out=below[:, 1:])
        return along, below

    @functools.cached_property
    def total(self) -> torch.Tensor:
        """(G,) elements of each group's subnet tensor."""
        return self.before(torch.tensor([self.numel]))[:, 0]

    def before(self, positions: torch.Tensor, group: int | None = None) -> torch.Tensor:
        """(G, P), or (P,) for one `group`: how many held elements have a flat index below each position:
        where a range starts in each group's flattened subnet."""
        positions = positions.to(torch.long)
        if self.along is None:
            return positions if group is not None else positions.expand(self.groups, -1)
        along, below = (self.along, self.below) if group is None else (self.along[group], self.below[group])
        outer = torch.div(positions, self.size * self.inner, rounding_mode="floor")
        rest = positions % (self.size * self.inner)
        coord, i = torch.div(rest, self.inner, rounding_mode="floor"), rest % self.inner
        partial = i * along[..., coord]  # the held elements of a held row before the position
        return (outer * below[..., -1:] + below[..., coord]) * self.inner + partial

    def piece_rows(self, lo: int, hi: int) -> PieceRows | PieceColumns | None:
        """The rows of flat range [lo, hi) each group holds; None where every group holds every element.

        A row is `inner` contiguous elements (one unit-axis coordinate of one outer index). Where the unit
        axis is the last one the held elements are every outer row's held columns (`PieceColumns`): picked
        and placed a column at a time, with no index per element."""
        if self.along is None:
            return None
        hi = max(hi, lo)
        counts = torch.diff(self.before(torch.tensor([lo, hi])), dim=1)[:, 0]
        if self.inner == 1 and self.size > 1:
            return self._held_columns(lo, hi, counts)
        first, stop = lo // self.inner, -(-hi // self.inner)
        if first // self.size == (stop - 1) // self.size:  # inside one outer index: a slice of the layout
            along = self.along[:, first % self.size : first % self.size + max(stop - first, 0)]
        else:
            along = self.along[:, torch.arange(first, stop) % self.size]
        _, row = along.nonzero(as_tuple=True)  # group-major, rows ascending
        return PieceRows(self.inner, lo - first * self.inner if hi > lo else 0, hi - lo, row, counts, along.sum(0))

    @functools.cached_property
    def _columns(self) -> tuple[torch.Tensor, list[int], torch.Tensor]:
        """Every group's held unit-axis coordinates, group after group, where each group's start and end, and
        each coordinate's holder count: the same for every part of the tensor."""
        group, column = self.along.nonzero(as_tuple=True)
        ends = exclusive_cumsum(torch.bincount(group, minlength=self.groups)).tolist() + [len(column)]
        return column, ends, self.along.sum(0)

    def _held_columns(self, lo: int, hi: int, counts: torch.Tensor) -> PieceColumns:
        """`piece_rows` of a tensor whose unit axis is its last: the held columns of whole outer rows."""
        column, ends, holders = self._columns
        first = lo // self.size
        return PieceColumns(self.size, lo - first * self.size, hi - lo, column, ends, counts, holders)


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
