"""What the exchanges move, as arithmetic every rank does alone: entries, held elements, buckets.

Unit ids are ascending in a spec, so a subnet tensor lists its elements in the order of their flat
index in the full tensor. A group's elements inside any flat range [lo, hi) of a full tensor are
therefore one contiguous run of its flattened subnet, whose ends are counted in O(1) (`Held.before`);
only the owner of a piece needs the held elements' positions, and only over its piece
(`Held.positions`).

Tensors travel in buckets of about `bucket_bytes` of full-width fp32 data, one collective per bucket:
a latency-bound phase becomes a bandwidth-bound one, and the exchange's temporaries are bounded by
the bucket, not by the largest tensor.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from itertools import groupby

import torch

from twist_scale.models import AxisSlice, UnitBlock
from twist_scale.subnet import SubnetSpec


@dataclass(frozen=True)
class Entry:
    """One central tensor as the exchange sees it: a parameter, a statistic or a moment (`name@key`)."""

    name: str
    shape: torch.Size
    unit: tuple[UnitBlock, AxisSlice] | None  # None: every group holds it whole
    whole: bool = False  # dispatch it full-width (a correction needs the dropped units too)
    part: tuple[int, int] | None = None  # [a, b) of every owner's piece; None: the whole piece

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def units(self, spec: SubnetSpec) -> torch.Tensor | None:
        return None if self.unit is None else spec.units(self.unit[0])


class Held:
    """Which elements of one full tensor a group holds: every element whose unit-axis coordinate it keeps."""

    def __init__(self, entry: Entry, units: torch.Tensor | None) -> None:
        self.along: torch.Tensor | None = None  # None: the whole tensor
        if units is None:
            return
        axis = entry.unit[1]
        coords = axis.index(units)
        if len(coords) > 1 and not bool((coords[1:] > coords[:-1]).all()):
            raise ValueError(f"{entry.name}: the packed exchange needs ascending unit ids, as sampled specs have")
        self.size, self.inner = entry.shape[axis.axis], math.prod(entry.shape[axis.axis + 1 :])
        # int32 offsets where they fit: half the memory of int64 for index_select / index_add_
        self.index_dtype = torch.int32 if entry.numel < 2**31 else torch.int64
        self.coords = coords.to(self.index_dtype)
        self.along = torch.zeros(self.size, dtype=torch.bool)
        self.along[coords] = True
        self.below = torch.cat([torch.zeros(1, dtype=torch.long), self.along.cumsum(0)]).tolist()  # held coords < c

    def before(self, position: int) -> int:
        """How many held elements have a flat index below `position`: where a range starts in the subnet."""
        if self.along is None:
            return position
        outer, rest = divmod(position, self.size * self.inner)
        coord, i = divmod(rest, self.inner)
        partial = i if bool(self.along[coord]) else 0  # the held elements of a held row before `position`
        return (outer * self.below[-1] + self.below[coord]) * self.inner + partial

    def positions(self, lo: int, hi: int) -> torch.Tensor | None:
        """Offsets from `lo` of the held elements of flat range [lo, hi), ascending (None: all of them).

        Built from the held rows (one unit-axis coordinate of one outer index, `inner` elements each)
        of the slabs the range touches, never from a mask over the range: index_select and index_add_
        on these offsets are several times faster than boolean indexing, which scans the range twice.
        """
        if self.along is None:
            return None
        if hi <= lo:
            return torch.empty(0, dtype=self.index_dtype)
        first, last = lo // self.inner, (hi - 1) // self.inner  # the rows the range touches
        base = first // self.size * self.size  # the first row of the first slab touched
        slabs = torch.arange(last // self.size - first // self.size + 1, dtype=self.index_dtype)
        # offsets from lo, the shift folded into the small operand so no pass runs over the large result
        if self.inner == 1:  # a row is one element: the held rows are the offsets
            flat = (slabs[:, None] * self.size + (self.coords + (base - lo))[None, :]).flatten()
        else:
            rows = (slabs[:, None] * self.size + self.coords[None, :]).flatten()  # held rows from `base`, ascending
            rows = rows[_at(rows, first - base) : _at(rows, last + 1 - base)]
            within = torch.arange(self.inner, dtype=self.index_dtype) + (base * self.inner - lo)
            flat = (rows[:, None] * self.inner + within[None, :]).flatten()
        return flat[_at(flat, 0) : _at(flat, hi - lo)]  # only the first and last rows can be partial


def _at(ascending: torch.Tensor, value: int) -> int:
    """How many entries of an ascending tensor are below `value`."""
    return int(torch.searchsorted(ascending, torch.tensor(value)))


def alike(bucket: list[Entry], dispatch: bool) -> Iterator[list[int]]:
    """Runs of consecutive entries with the same holders over the same range: a weight and its moments.

    They share one Held, one set of positions and (in aggregation) one holder count. In dispatch a
    `whole` entry is held whole, unlike its moments.
    """

    def key(i: int) -> tuple:
        return bucket[i].name.partition("@")[0], bucket[i].part, dispatch and bucket[i].whole

    for _, run in groupby(range(len(bucket)), key):
        yield list(run)


def buckets(
    entries: list[Entry], bucket_bytes: int, elements: Callable[[Entry], int] = lambda e: e.numel
) -> list[list[Entry]]:
    """Consecutive entries whose full-width fp32 size (`elements` of each) adds up to about `bucket_bytes`."""
    out: list[list[Entry]] = [[]]
    size = 0
    for entry in entries:
        if out[-1] and size + 4 * elements(entry) > bucket_bytes:
            out.append([])
            size = 0
        out[-1].append(entry)
        size += 4 * elements(entry)
    return [b for b in out if b]


def plan_buckets(
    entries: list[Entry], bucket_bytes: int, world: int, piece_len: Callable[[str], int]
) -> list[list[Entry]]:
    """Buckets of about `bucket_bytes`, a tensor larger than one cut into parts of about a bucket: each
    part the same sub-range of every owner's piece (`piece_len(name)` elements), so a group's elements
    in it are still one run per owner."""
    step = max(1, bucket_bytes // (4 * world))  # elements of each owner's piece per part
    parts = []
    for entry in entries:
        k = piece_len(entry.name)
        if 4 * entry.numel <= bucket_bytes or step >= k:
            parts.append(entry)
        else:
            parts += [replace(entry, part=(a, min(a + step, k))) for a in range(0, k, step)]
    return buckets(parts, bucket_bytes, lambda e: e.numel if e.part is None else (e.part[1] - e.part[0]) * world)
