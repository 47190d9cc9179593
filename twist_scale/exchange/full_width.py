"""The full-width exchange: whole tensors on the wire, one collective per tensor, whatever κ.

Aggregation streams one tensor at a time: group g contributes M_g ⊙ θ_g in full coordinates, dp rank
r of the group sends only chunk r of it, and a reduce-scatter over the G ranks that share dp position r
leaves each owner the sum over groups of its own piece. Holder counts need no communication: every
rank knows every group's spec. Owners divide by the count and keep the old value where no group held
a unit. Dispatch is the inverse: all-gather a tensor, slice it. Kept selectable (`--twist.aggregation
dense`) as the reference the packed exchange is measured and tested against.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from twist_scale.central import CentralShards
from twist_scale.correction import dropped_contribution
from twist_scale.exchange.base import SubnetSource
from twist_scale.exchange.entries import Entry, buckets
from twist_scale.models import AxisSlice, UnitBlock
from twist_scale.subnet import SubnetSpec, scatter_tensor, slice_tensor


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

    def prepare(self, entries: list[Entry], source: SubnetSource) -> None: ...

    def plan(self, entries: list[Entry], bucket_bytes: int) -> list[list[Entry]]:
        return buckets(entries, bucket_bytes, lambda e: e.numel)  # whole tensors: each is one collective anyway

    def receives_shard(self, entry: Entry) -> bool:
        return False  # every rank receives whole subnet tensors

    def dispatch(self, bucket: list[Entry], specs: list[SubnetSpec]) -> dict[str, torch.Tensor]:
        out = {}
        for entry in bucket:
            full = self.central.gather(entry.key)
            keep = entry.whole or entry.unit is None
            out[entry.key] = (
                full if keep else slice_tensor(full, entry.unit[1], specs[self.topo.group].units(entry.unit[0]))
            )
        return out

    def note_dispatched(self, entries: list[Entry], source: SubnetSource) -> None: ...

    def aggregate(self, bucket: list[Entry], source: SubnetSource, specs: list[SubnetSpec]) -> None:
        spec = specs[self.topo.group]
        for entry in bucket:
            contribution = masked_contribution(source.read(entry), entry.shape, entry.unit, spec)
            self._reduce(entry.key, contribution, holder_counts(entry.shape, entry.unit, specs))

    def _reduce(self, key: str, contribution: torch.Tensor, counts: torch.Tensor) -> None:
        """Holder mean of the groups' contributions (already masked, full coordinates) into the shard."""
        central, topo = self.central, self.topo
        k, G, R = central.piece_len(key), topo.groups, topo.ranks_per_group

        def pieces(full: torch.Tensor) -> torch.Tensor:  # (G, k): this dp position's piece of each group
            return central.padded_flat(full, key).view(G, R, k)[:, topo.dp_rank]

        send = pieces(contribution).flatten().to(topo.device)
        summed = torch.empty(k, device=topo.device)
        dist.reduce_scatter_single(summed, send, op=dist.ReduceOp.SUM, group=topo.cross_group)
        central.traffic.add((send.numel() - k) * send.element_size())  # sent to the other owners
        count = pieces(counts)[topo.group]
        old = central.shards.get(key, torch.zeros(k))
        central.shards[key] = central.host(torch.where(count > 0, summed.cpu() / count.clamp(min=1), old))

    def shifts(
        self, outputs: list[tuple[UnitBlock, Entry]], specs: list[SubnetSpec], means: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """From each output projection gathered whole (one collective each), as the reference does it."""
        spec = specs[self.topo.group]
        return {
            block.output_module: dropped_contribution(
                self.central.gather(entry.key), means[block.output_module], block, spec.units(block)
            )
            for block, entry in outputs
        }
