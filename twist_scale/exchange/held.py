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

    def piece_rows(self, lo: int, hi: int) -> PieceRows | None:
        """The rows of flat range [lo, hi) each group holds; None where every group holds every element.

        A row is `inner` contiguous elements (one unit-axis coordinate of one outer index). Where the unit
        axis is the last one a row is one element, and the held ones are every outer row's held columns,
        found from the G held column lists rather than from a G × range mask."""
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
    def _columns(self) -> tuple[torch.Tensor, list[int]]:
        """Every group's held unit-axis coordinates, group after group, and where each group's start and end:
        the same for every part of the tensor."""
        group, column = self.along.nonzero(as_tuple=True)
        return column, exclusive_cumsum(torch.bincount(group, minlength=self.groups)).tolist() + [len(column)]

    def _held_columns(self, lo: int, hi: int, counts: torch.Tensor) -> PieceRows:
        """`piece_rows` of a tensor whose unit axis is its last: each outer row's held columns, group after
        group, cut to the range."""
        first, stop = lo // self.size, -(-hi // self.size)  # the outer rows the range touches
        column, ends = self._columns
        held = torch.arange(first, stop)[:, None] * self.size + column - lo  # (outer rows, all groups' columns)
        row = torch.cat([held[:, a:b].flatten() for a, b in zip(ends[:-1], ends[1:], strict=True)])
        if lo % self.size or hi % self.size:  # the first or last outer row is partly outside the range
            row = row[(row >= 0) & (row < hi - lo)]
        holders = self.along.sum(0).repeat(stop - first)[lo - first * self.size :][: hi - lo]
        return PieceRows(1, 0, hi - lo, row, counts, holders)


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

    def _real(self) -> torch.Tensor | None:
        """(H, inner) bool: which elements of the held rows lie inside the range; None where all do."""
        if self.skip == 0 and self.tail == 0:
            return None
        real = torch.ones(len(self.rows), self.inner, dtype=torch.bool)
        real[self.rows == 0, : self.skip] = False
        real[self.rows == len(self.holders) - 1, self.inner - self.tail :] = False
        return real

    def padded(self, values: torch.Tensor) -> torch.Tensor:
        """(touched rows, inner): the range's `values` as whole rows; a view of them where the range is."""
        if self.skip == 0 and self.tail == 0:
            return values.view(len(self.holders), self.inner)
        rows = values.new_zeros(len(self.holders) * self.inner)
        rows[self.skip : self.skip + self.length] = values
        return rows.view(len(self.holders), self.inner)

    def unpadded(self, rows: torch.Tensor) -> torch.Tensor:
        """The inverse of `padded`: the range's elements of whole rows (a view)."""
        return rows.flatten()[self.skip : self.skip + self.length]

    def select(self, values: torch.Tensor) -> torch.Tensor:
        """Each group's held elements of the range's `values`, group after group, in flat order."""
        held = self.padded(values).index_select(0, self.rows)
        real = self._real()
        return held.flatten() if real is None else held[real]

    def add_to(self, rows: torch.Tensor, held: torch.Tensor) -> None:
        """Adds `held` (laid out as `select` gives it) to whole `rows` (as `padded` gives them)."""
        real = self._real()
        if real is None:
            spread = held.view(len(self.rows), self.inner)
        else:
            spread = held.new_zeros(len(self.rows), self.inner)
            spread[real] = held
        rows.index_add_(0, self.rows, spread)
