"""Which elements of a full tensor each group holds, for every group at once: index arithmetic on tensors.

Unit ids are ascending in a spec, so a subnet tensor lists its elements in the order of their flat index
in the full tensor. A group's elements inside any flat range [lo, hi) of a full tensor are therefore one
contiguous run of its flattened subnet, whose ends are counted from a prefix sum over the unit axis
(`HeldGroups.before`, any number of positions, every group, one tensor expression); only the owner of a
piece needs the held elements' positions, and only over its piece (`HeldGroups.positions`).
"""

from __future__ import annotations

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
        channels = axis.index(torch.arange(unit[0].num_units))
        if len(channels) > 1 and not bool((channels[1:] > channels[:-1]).all()):
            raise ValueError(f"{axis.name}: the packed exchange needs a unit axis laid out in ascending unit order")
        along = torch.zeros(len(masks), size, dtype=torch.bool)
        along[:, channels] = axis.spread(masks)
        return along, torch.cat([torch.zeros(len(masks), 1, dtype=torch.long), along.cumsum(1)], 1)

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

    def count(self, lo: int, hi: int) -> torch.Tensor:
        """(hi - lo,): how many groups hold each element of flat range [lo, hi), counted per row."""
        if self.along is None:
            return torch.full((hi - lo,), self.groups)
        if hi <= lo:
            return torch.zeros(0, dtype=torch.long)
        first = lo // self.inner
        rows = torch.arange(first, (hi - 1) // self.inner + 1)
        per_row = self.along[:, rows % self.size].sum(0)
        skip = lo - first * self.inner
        return per_row.repeat_interleave(self.inner)[skip : skip + hi - lo]

    def positions(self, lo: int, hi: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Offsets from `lo` of each group's held elements of flat range [lo, hi), ascending, concatenated
        group after group, and each group's count (G,); None where every group holds every element.

        Built from the held rows (one unit-axis coordinate of one outer index, `inner` elements each) the
        range touches, never from a mask over the range's elements.
        """
        if self.along is None:
            return None
        if hi <= lo:
            return torch.empty(0, dtype=torch.long), torch.zeros(self.groups, dtype=torch.long)
        rows = torch.arange(lo // self.inner, (hi - 1) // self.inner + 1)
        group, row = self.along[:, rows % self.size].nonzero(as_tuple=True)  # group-major, rows ascending
        flat = ((rows[row] * self.inner - lo)[:, None] + torch.arange(self.inner)).flatten()
        inside = (flat >= 0) & (flat < hi - lo)  # only a range's first and last rows can be partial
        counts = torch.zeros(self.groups, dtype=torch.long).index_add_(
            0, group, inside.view(len(group), self.inner).sum(1)
        )
        return flat[inside], counts
