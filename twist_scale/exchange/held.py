"""Which elements of a full tensor each group holds, for every group at once: index arithmetic on tensors.

Unit ids are ascending in a spec, so a subnet tensor lists its elements in the order of their flat index
in the full tensor. A group's elements inside any flat range [lo, hi) of a full tensor are therefore one
contiguous run of its flattened subnet, whose ends are counted from a prefix sum over the unit axis
(`HeldGroups.before`, any number of positions, every group, one tensor expression); only the owner of a
piece needs to place or pick the held elements, and it does so per row of its piece (`PieceRows`).
"""

from __future__ import annotations

import functools
import math

import torch

from twist_scale.exchange.pieces import PieceColumns, PieceRows
from twist_scale.exchange.runs import exclusive_cumsum
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
