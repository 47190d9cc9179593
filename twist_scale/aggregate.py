"""The central model, sharded over the world, and its masked reduce-scatter aggregation.

Rank (g, r) — global rank g*R + r — owns piece g*R + r of every flattened full-width tensor.
Aggregation streams one tensor at a time: group g contributes M_g ⊙ θ_g in full coordinates,
dp rank r of the group sends only chunk r of it, and a reduce-scatter over the G ranks that share
dp position r leaves each owner the sum over groups of its own piece. Holder counts need no
communication: every rank knows every group's spec. Owners divide by the count and keep the old
value where no group held a unit. Dispatch is the inverse: all-gather a tensor, slice it.
This is the dense exchange, kept selectable (`--twist.aggregation dense`) as the reference the
packed exchange (`twist_scale.packing`) is measured and tested against: its traffic ignores κ.

Shards live in host memory (pinned when collectives run on CUDA) and only the payload of each
collective is staged on the communication device: the central model is fp32 weights plus moments,
touched once per round, and accelerator memory is kept for the subnet being trained.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

from twist_scale.exchange_plan import Entry, buckets
from twist_scale.models import AxisSlice, UnitBlock
from twist_scale.subnet import SubnetSpec, scatter_tensor, slice_tensor
from twist_scale.topology import Topology


@dataclass
class Traffic:
    """What the synchronisation put on the wire: collectives, and payload bytes this rank sent (aggregation)
    or received (dispatch, gathers) to or from other ranks; its own part never leaves the process."""

    bytes: int = 0
    collectives: int = 0

    def add(self, payload_bytes: int) -> None:
        self.bytes += payload_bytes
        self.collectives += 1


def holder_counts(shape: torch.Size, unit: tuple[UnitBlock, AxisSlice] | None, specs: list[SubnetSpec]) -> torch.Tensor:
    """How many groups hold each element: G for shared tensors, the per-unit holder count otherwise."""
    if unit is None:
        return torch.full(shape, float(len(specs)))
    unit_block, axis = unit
    per_unit = torch.zeros(unit_block.num_units)
    for spec in specs:
        per_unit[spec.units(unit_block)] += 1
    along = torch.zeros(shape[axis.axis])
    along[axis.index(torch.arange(unit_block.num_units))] = axis.spread(per_unit)
    view = [1] * len(shape)
    view[axis.axis] = shape[axis.axis]
    return along.view(view).expand(shape)


class CentralShards:
    """Full-width tensors (parameters, unit statistics, optimizer moments), sharded world-wide."""

    def __init__(self, topo: Topology, shapes: dict[str, torch.Size]) -> None:
        self.topo = topo
        self.shapes = dict(shapes)
        self.shards: dict[str, torch.Tensor] = {}
        self.pin = topo.device.type == "cuda"  # page-locked host memory: asynchronous DMA to the GPU
        self.traffic = Traffic()  # collective payloads this rank moved since the last read, for tracking

    def piece_len(self, name: str) -> int:
        n = self.shapes[name.split("@")[0]].numel()
        return -(-n // self.topo.world_size)

    def _padded_flat(self, full: torch.Tensor, name: str) -> torch.Tensor:
        """The tensor flattened and zero-padded to world_size equal pieces."""
        pad = self.piece_len(name) * self.topo.world_size - full.numel()
        return torch.nn.functional.pad(full.detach().flatten().float(), (0, pad))

    def piece_range(self, name: str) -> tuple[int, int] | None:
        """The flat range [lo, hi) of tensor `name` this rank owns (short or empty at the end); None when
        the central model does not hold `name`."""
        if name.split("@")[0] not in self.shapes:
            return None
        n, k = self.shapes[name.split("@")[0]].numel(), self.piece_len(name)
        return min(self.topo.rank * k, n), min((self.topo.rank + 1) * k, n)

    def set_piece(self, name: str, values: torch.Tensor) -> None:
        """Keep `values`, this rank's `piece_range` of tensor `name` (zero-padded to the piece length)."""
        piece = torch.zeros(self.piece_len(name))
        piece[: values.numel()] = values.detach().flatten()
        self.shards[name] = self.host(piece)

    def host(self, t: torch.Tensor) -> torch.Tensor:
        """`t` as an fp32 host tensor, the form every shard is kept in (copied only to convert or pin)."""
        t = t.to("cpu", torch.float32)
        return t.pin_memory() if self.pin else t

    def set_full(self, name: str, full: torch.Tensor) -> None:
        """Keep this rank's piece of a full tensor every rank holds (initialisation, pretrained load)."""
        lo, hi = self.piece_range(name)
        self.set_piece(name, full.detach().flatten()[lo:hi])

    def load_resharded(self, old_shards: Sequence[dict[str, torch.Tensor]], old_world: int) -> None:
        """This rank's pieces, cut from the pieces a world of `old_world` ranks kept (same flat layout)."""
        self.shards = {}
        for name in old_shards[0]:
            n, (lo, hi) = self.shapes[name.split("@")[0]].numel(), self.piece_range(name)
            old_k = -(-n // old_world)
            piece = torch.zeros(self.piece_len(name))
            for q in range(lo // old_k, -(-hi // old_k)):  # the old pieces this range overlaps
                a, b = max(lo, q * old_k), min(hi, (q + 1) * old_k)
                piece[a - lo : b - lo] = old_shards[q][name][a - q * old_k : b - q * old_k]
            self.shards[name] = self.host(piece)

    def gather(self, name: str, dst: int | None = None) -> torch.Tensor | None:
        """The full tensor, reassembled from every rank's piece (one collective over the world): on every
        rank, or on rank `dst` only (None elsewhere), which is all an export needs."""
        shard = self.shards[name].to(self.topo.device, non_blocking=True)
        world = self.topo.world_size
        if dst is None:
            out = torch.empty(shard.numel() * world, device=shard.device)
            dist.all_gather_single(out, shard)
        else:
            parts = [torch.empty_like(shard) for _ in range(world)] if self.topo.rank == dst else None
            dist.gather(shard, parts, dst=dst)
            if parts is None:
                return None
            out = torch.cat(parts)
        self.traffic.add((out.numel() - shard.numel()) * out.element_size())  # received from the other ranks
        shape = self.shapes[name.split("@")[0]]
        return out[: shape.numel()].view(shape).cpu()

    def aggregate(self, name: str, contribution: torch.Tensor, counts: torch.Tensor) -> None:
        """Holder mean of the groups' contributions (already masked, full coordinates) into the shard."""
        topo, k = self.topo, self.piece_len(name)
        G, R = topo.groups, topo.ranks_per_group

        def pieces(full: torch.Tensor) -> torch.Tensor:  # (G, k): this dp position's piece of each group
            return self._padded_flat(full, name).view(G, R, k)[:, topo.dp_rank]

        send = pieces(contribution).flatten().to(topo.device)
        summed = torch.empty(k, device=topo.device)
        dist.reduce_scatter_single(summed, send, op=dist.ReduceOp.SUM, group=topo.cross_group)
        self.traffic.add((send.numel() - k) * send.element_size())  # sent to the other owners
        count = pieces(counts)[topo.group]
        old = self.shards.get(name, torch.zeros(k))
        self.shards[name] = self.host(torch.where(count > 0, summed.cpu() / count.clamp(min=1), old))


def masked_contribution(
    sub: torch.Tensor, full_shape: torch.Size, unit: tuple[UnitBlock, AxisSlice] | None, spec: SubnetSpec
) -> torch.Tensor:
    """M ⊙ θ in full coordinates, fp32 on the host; shared tensors are contributed whole."""
    sub = sub.detach().to("cpu", torch.float32)
    if unit is None:
        return sub
    unit_block, axis = unit
    return scatter_tensor(sub, full_shape, axis, spec.units(unit_block))


class FullWidthExchange:
    """Full-width tensors on the wire, one collective per tensor: the reference for `PackedExchange`."""

    sends_changes = False  # values, always in fp32

    def __init__(self, central: CentralShards) -> None:
        self.central, self.topo = central, central.topo

    def plan(self, entries: list[Entry], bucket_bytes: int) -> list[list[Entry]]:
        return buckets(entries, bucket_bytes)  # whole tensors: each is one collective anyway

    def receives_shard(self, entry: Entry) -> bool:
        return False  # every rank receives whole subnet tensors

    def aggregate(self, bucket: list[Entry], read: Callable[[Entry], torch.Tensor], specs: list[SubnetSpec]) -> None:
        spec = specs[self.topo.group]
        for entry in bucket:
            contribution = masked_contribution(read(entry), entry.shape, entry.unit, spec)
            self.central.aggregate(entry.name, contribution, holder_counts(entry.shape, entry.unit, specs))

    def dispatch(self, bucket: list[Entry], specs: list[SubnetSpec]) -> dict[str, torch.Tensor]:
        out = {}
        for entry in bucket:
            full = self.central.gather(entry.name)
            keep = entry.whole or entry.unit is None
            out[entry.name] = full if keep else slice_tensor(full, entry.unit[1], entry.units(specs[self.topo.group]))
        return out
