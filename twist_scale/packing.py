"""Packed, bucketed exchange between the groups' subnets and the sharded central model.

The dense exchange moves full-width tensors: a zero-filled masked reduce-scatter to aggregate and an
all-gather of every full tensor to dispatch, so its traffic ignores κ. Here only held elements
travel. Every rank knows every group's spec, so for any flat range of a full tensor each rank can
compute locally which elements a group holds and where they sit in that group's subnet tensor; the
split sizes of an all-to-all follow without any handshake.

- Aggregation: dp rank r of group g sends, to each owner at dp position r (the G ranks of its
  cross group), the elements of its subnet that fall in that owner's piece. An owner adds what each
  group sent and divides by how many groups sent each element (the holder count, never materialised
  beyond its piece); elements nobody held keep their value. Bytes sent ∝ κ/R of the model.
- Dispatch: each owner sends to every rank the elements of its piece that rank's group holds (one
  all-to-all over the world); a rank receives its group's subnet, ∝ κ of the model.

Tensors travel in buckets of about `bucket_bytes` of full-width fp32 data: one all-to-all per
bucket, and temporary memory bounded by the bucket (a tensor larger than a bucket is a bucket of its
own). The aggregation payload can travel in bf16 (owners accumulate in fp32); dispatch is always
fp32, so a round starts from the central weights exactly.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist

from twist_scale.models import AxisSlice, UnitBlock
from twist_scale.subnet import SubnetSpec

WIRE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class Entry:
    """One central tensor as the exchange sees it: a parameter, a statistic or a moment (`name@key`)."""

    name: str
    shape: torch.Size
    unit: tuple[UnitBlock, AxisSlice] | None  # None: every group holds it whole
    whole: bool = False  # dispatch it full-width (a correction needs the dropped units too)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def units(self, spec: SubnetSpec) -> torch.Tensor | None:
        return None if self.unit is None else spec.units(self.unit[0])


def held(shape: torch.Size, unit: tuple[UnitBlock, AxisSlice] | None, units: torch.Tensor | None, lo: int, hi: int):
    """The elements of flat range [lo, hi) of a full tensor that a group with `units` holds.

    Returns (offsets from lo, flat indices into the group's subnet tensor), both int64. The subnet
    keeps the held coordinates along the unit axis in `AxisSlice.index` order (as slicing does).
    `units` None means the whole tensor (a shared tensor, or one dispatched whole).
    """
    flat = torch.arange(lo, hi)
    if units is None:
        return flat - lo, flat
    axis = unit[1]
    size, inner = shape[axis.axis], math.prod(shape[axis.axis + 1 :])
    coords = axis.index(units)
    position = torch.full((size,), -1, dtype=torch.long)
    position[coords] = torch.arange(len(coords))
    along = position[(flat // inner) % size]
    keep = along >= 0
    flat, along = flat[keep], along[keep]
    return flat - lo, ((flat // (size * inner)) * len(coords) + along) * inner + flat % inner


def buckets(entries: list[Entry], bucket_bytes: int) -> list[list[Entry]]:
    """Consecutive entries whose full-width fp32 size adds up to about `bucket_bytes`."""
    out: list[list[Entry]] = [[]]
    size = 0
    for entry in entries:
        if out[-1] and size + 4 * entry.numel > bucket_bytes:
            out.append([])
            size = 0
        out[-1].append(entry)
        size += 4 * entry.numel
    return [b for b in out if b]


class PackedExchange:
    """Moves only held elements between the engines' subnets and the central shards (see module doc)."""

    def __init__(self, central, wire: str = "fp32") -> None:  # noqa: ANN001 - a CentralShards
        self.central, self.topo, self.wire = central, central.topo, WIRE_DTYPES[wire]

    def _range(self, entry: Entry, piece: int) -> tuple[int, int]:
        k = self.central.piece_len(entry.name)
        return min(piece * k, entry.numel), min((piece + 1) * k, entry.numel)

    def _all_to_all(
        self,
        send: list[torch.Tensor],
        in_splits: list[int],
        out_splits: list[int],
        group,  # noqa: ANN001
        dtype: torch.dtype,
        wire_elements: int,
    ) -> torch.Tensor:
        """One all-to-all; `wire_elements` of it cross to or from other ranks (the rest is this rank's own)."""
        device = self.topo.device
        payload = torch.cat(send).to(device, dtype) if send else torch.empty(0, device=device, dtype=dtype)
        send.clear()  # the pieces are in the payload now
        recv = torch.empty(sum(out_splits), device=device, dtype=dtype)
        dist.all_to_all_single(recv, payload, out_splits, in_splits, group=group)
        self.central.traffic.add(wire_elements * payload.element_size())
        return recv.to("cpu", torch.float32)

    def aggregate(self, bucket: list[Entry], read: Callable[[Entry], torch.Tensor], specs: list[SubnetSpec]) -> None:
        """Holder mean of the groups' subnet tensors into the shards; `read` gives this group's, one at a time."""
        topo = self.topo
        G, R, r = topo.groups, topo.ranks_per_group, topo.dp_rank
        mine = specs[topo.group]
        send: list[torch.Tensor] = []
        in_splits = [0] * G
        for entry in bucket:  # one subnet tensor alive at a time: only its pieces for the owners are kept
            flat = read(entry).reshape(-1)
            for owner_group in range(G):
                _, index = held(entry.shape, entry.unit, entry.units(mine), *self._range(entry, owner_group * R + r))
                send.append(flat[index].float())
                in_splits[owner_group] += len(index)
            del flat
        send = [send[i * G + g] for g in range(G) for i in range(len(bucket))]  # owner-major, as the splits
        plan, out_splits = self._incoming(bucket, [specs[g] for g in range(G)], topo.rank, offsets=True)
        sent = sum(in_splits) - in_splits[topo.group]  # to the other owners
        received = self._all_to_all(send, in_splits, out_splits, topo.cross_group, self.wire, sent)
        total = {e.name: torch.zeros(self.central.piece_len(e.name)) for e in bucket}
        count = {e.name: torch.zeros(self.central.piece_len(e.name)) for e in bucket}
        for (name, offsets), values in zip(plan, received.split([len(o) for _, o in plan]), strict=True):
            total[name][offsets] += values  # one source at a time: offsets are unique within a source
            count[name][offsets] += 1
        for entry in bucket:
            old = self.central.shards.get(entry.name, torch.zeros_like(total[entry.name]))
            c = count[entry.name]
            self.central.shards[entry.name] = self.central.host(
                torch.where(c > 0, total[entry.name] / c.clamp(min=1), old)
            )

    def dispatch(self, bucket: list[Entry], specs: list[SubnetSpec]) -> dict[str, torch.Tensor]:
        """This group's subnet tensor of every entry (the full tensor for `whole` entries), by name."""
        topo = self.topo
        R = topo.ranks_per_group
        send, in_splits = [], []
        for dest in range(topo.world_size):
            n = 0
            for entry in bucket:
                units = None if entry.whole else entry.units(specs[dest // R])
                offsets, _ = held(entry.shape, entry.unit, units, *self._range(entry, topo.rank))
                send.append(self.central.shards[entry.name][offsets])
                n += len(offsets)
            in_splits.append(n)
        mine = specs[topo.group]
        plan, out_splits = self._incoming(bucket, [mine] * topo.world_size, None, offsets=False)
        incoming = sum(out_splits) - out_splits[topo.rank]  # from the other owners
        # fp32 always: the engines' master weights start every round from these values exactly
        received = self._all_to_all(send, in_splits, out_splits, None, torch.float32, incoming)
        shapes = {e.name: self._received_shape(e, mine) for e in bucket}
        out = {name: torch.empty(math.prod(shape)) for name, shape in shapes.items()}
        for (name, index), values in zip(plan, received.split([len(i) for _, i in plan]), strict=True):
            out[name][index] = values
        return {name: out[name].view(shape) for name, shape in shapes.items()}

    @staticmethod
    def _received_shape(entry: Entry, spec: SubnetSpec) -> list[int]:
        shape = list(entry.shape)
        if entry.unit is not None and not entry.whole:
            shape[entry.unit[1].axis] = len(entry.unit[1].index(entry.units(spec)))
        return shape

    def _incoming(
        self, bucket: list[Entry], source_specs: list[SubnetSpec], piece: int | None, offsets: bool
    ) -> tuple[list[tuple[str, torch.Tensor]], list[int]]:
        """What each source sends this rank, in send order: (entry name, offsets or subnet indices) and split sizes.

        Aggregation (`piece` given): source g sends its group's held elements of this rank's piece.
        Dispatch (`piece` None): source q sends the elements of its own piece this rank's group holds.
        """
        plan, splits = [], []
        for source, spec in enumerate(source_specs):
            n = 0
            for entry in bucket:
                units = None if entry.whole and piece is None else entry.units(spec)
                o, i = held(entry.shape, entry.unit, units, *self._range(entry, source if piece is None else piece))
                plan.append((entry.name, o if offsets else i))
                n += len(o)
            splits.append(n)
        return plan, splits
