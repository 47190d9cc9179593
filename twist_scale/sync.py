"""Synchronisation between the groups' engines: TwIST's dispatch and aggregation, or nothing (data parallel).

SubnetSync dispatches (central model → one group's engine) and aggregates (engines → central model),
bucket by bucket, so beside its shard of the central model and its group's subnet a rank holds about
one bucket in flight. DataParallelSync is the same interface for plain data parallelism, where the
engine already holds the whole model, so the loop has no data-parallel branches. Both see an engine
only through its storage (`engines.storage.EngineStorage`); `assembly` builds them.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator

import torch
import torch.distributed as dist

from twist_scale.central import CentralShards, Traffic
from twist_scale.config import DEFAULT_BUCKET_MB
from twist_scale.correction import ACT_MEAN, ACT_SQ_MEAN, Correction, is_statistic
from twist_scale.engines.base import even_range
from twist_scale.engines.storage import EngineStorage
from twist_scale.exchange import Entry, Exchange, PackedExchange
from twist_scale.exchange.held import input_channels
from twist_scale.importance import fluctuation, unit_importance, variance
from twist_scale.models import UnitBlock
from twist_scale.subnet import SubnetSpec, axis_of, slice_tensor
from twist_scale.topology import Topology


def verify_same_masks(specs: list[SubnetSpec], topo: Topology) -> None:
    """Masks are never sent, so prove every rank computed the same ones (a cheap hash all-reduce)."""
    digest = b"".join(s.fingerprint() for s in specs)
    value = int.from_bytes(hashlib.sha256(digest).digest()[:7], "little")
    lo, hi = (torch.tensor([value], device=topo.device) for _ in range(2))
    dist.all_reduce(lo, op=dist.ReduceOp.MIN)
    dist.all_reduce(hi, op=dist.ReduceOp.MAX)
    if lo.item() != hi.item():
        raise RuntimeError(
            f"rank {topo.rank}: ranks disagree on the subnet masks (hash {value:x}); every rank must run the "
            "same config and --seed"
        )


class DataParallelSync:
    """Data parallelism: one group holds the whole model, so there is nothing to dispatch or aggregate."""

    moments: tuple[str, ...] = ()  # the engine keeps its own optimizer state
    engine_in_checkpoint = True  # the engine's files are the model's only copy

    def __init__(self, storage: EngineStorage) -> None:
        self.storage = storage

    def dispatch(self, specs: list[SubnetSpec]) -> None: ...

    def aggregate(self, specs: list[SubnetSpec]) -> None: ...

    def full_state(self) -> Iterator[tuple[str, torch.Tensor]]:
        """The full model, one tensor at a time (collective within the group)."""
        for name in self.storage.params:
            yield name, self.storage.read(name)

    def local_tensors(self) -> Iterable[torch.Tensor]:
        return self.storage.local_tensors()

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {}  # the engine's own checkpoint holds the model

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None: ...

    def take_traffic(self) -> Traffic:
        return Traffic()


class SubnetSync:
    """TwIST's synchronisation: dispatch slices each group's subnet out of the sharded central model;
    aggregation averages the groups' subnets back into it. Both go bucket by bucket through an
    exchange (`twist_scale.exchange`), which reads the engine through this class (`SubnetSource`)."""

    # Dispatch rewrites every weight (and, aggregated, every moment) of the engine from the central
    # model, so a checkpoint needs no engine files: `Engine.resume_at` rebuilds its step and schedule.
    engine_in_checkpoint = False

    def __init__(
        self,
        central: CentralShards,
        storage: EngineStorage,
        unit_blocks: list[UnitBlock],
        topo: Topology,
        moments: tuple[str, ...],
        correction: Correction,
        reset_moments: bool,
        exchange: Exchange | None = None,
        bucket_mb: float = DEFAULT_BUCKET_MB,
    ) -> None:
        self.central, self.storage, self.topo = central, storage, topo
        self.correction, self.reset_moments, self.moments = correction, reset_moments, moments
        self.exchange = exchange or PackedExchange(central)
        self.bucket_bytes = int(bucket_mb * 2**20)
        unit_axes = axis_of(unit_blocks)
        self.entries: list[Entry] = []
        self.outputs: list[tuple[UnitBlock, Entry]] = []  # each partitioned block's output projection
        for name, shape in central.shapes.items():
            unit = unit_axes.get(name)
            self.entries.append(Entry(name, shape, unit, whole=is_statistic(name)))
            if unit is not None and name == unit[0].output_axis.name:
                self.outputs.append((unit[0], self.entries[-1]))
            if not is_statistic(name):
                self.entries += [Entry(name, shape, unit, moment=key) for key in moments]
        self.last_read: tuple[str, tuple[int, torch.Tensor]] | None = None  # a tensor cut into parts is read once
        self.exchange.prepare(self.entries, self)

    def full_state(self) -> Iterator[tuple[str, torch.Tensor | None]]:
        """The full-width central model, one tensor at a time (collective over the world), on rank 0
        only: the export's writer (None on the other ranks)."""
        for name in self.central.shapes:
            yield name, self.central.gather(name, dst=0)

    def local_tensors(self) -> Iterable[torch.Tensor]:
        return self.central.shards.values()

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.central.shards

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.central.shards = {name: self.central.host(t) for name, t in state.items()}

    def load_resharded(self, states: list[dict[str, torch.Tensor]], old_world: int) -> None:
        self.central.load_resharded(states, old_world)

    def take_traffic(self) -> Traffic:
        """What this rank put on the wire since the last call, for tracking."""
        traffic, self.central.traffic = self.central.traffic, Traffic()
        return traffic

    def dispatch(self, specs: list[SubnetSpec]) -> None:
        """Slice the central model into this group's engine (weights, moments, corrections)."""
        spec = specs[self.topo.group]
        present = [e for e in self.entries if e.key in self.central.shards]  # no moments before the first aggregation
        by_key = {e.key: e for e in present}
        means: dict[str, torch.Tensor] = {}
        for bucket in self.exchange.plan(present, self.bucket_bytes):
            for key, value in self.exchange.dispatch(bucket, specs).items():
                self._write(by_key[key], value, spec, means)
        shifts = self.exchange.shifts(self.outputs, specs, means) if self.correction.needs_shift else {}
        for unit_block, _ in self.outputs:
            module = self.storage.submodule(unit_block.output_module)
            self.correction.dispatch(module, unit_block, spec.units(unit_block), shifts.get(unit_block.output_module))
        if self.reset_moments:
            self.storage.reset_optimizer_state()
        self.exchange.note_dispatched(present, self)

    def _write(self, entry: Entry, value: torch.Tensor, spec: SubnetSpec, means: dict[str, torch.Tensor]) -> None:
        if self.exchange.receives_shard(entry):  # this rank's flat range of the subnet tensor
            self.storage.write_shard(entry.name, entry.moment, value)
        elif entry.moment:
            self.storage.write_state(entry.name, entry.moment, value)
        elif is_statistic(entry.name):  # full width on every rank: the shifts read the dropped units' means
            if entry.name.endswith(ACT_MEAN):
                means[entry.name.rpartition(".")[0]] = value
            sub = slice_tensor(value, entry.unit[1], spec.units(entry.unit[0])) if entry.unit else value
            self.storage.write_buffer(entry.name, sub)
        else:
            self.storage.write(entry.name, value)

    def unit_importance(self) -> dict[tuple[int, str], torch.Tensor]:
        """Every partitioned unit's importance in the central model (`importance`), the same on every rank
        (collective over the world): each owner adds its pieces' squared column norms of the output
        projection and its pieces of E[x], E[x²] into one (3, channels) vector per block, and one all-reduce
        sums them; 3 floats per channel whatever the world size (at Llama-70B, 80 layers: 8.9 M floats)."""
        parts = []
        for block, entry in self.outputs:
            axis, central = block.output_input_axis, self.central
            channels = torch.zeros(3, entry.shape[axis])
            lo, hi = central.piece_range(entry.key)
            column_sq = central.shards[entry.key][: hi - lo] ** 2
            channels[0].index_add_(0, input_channels(torch.arange(lo, hi), entry.shape, axis), column_sq)
            for row, stat in ((1, ACT_MEAN), (2, ACT_SQ_MEAN)):
                name = f"{block.output_module}.{stat}"
                lo, hi = central.piece_range(name)
                channels[row, lo:hi] = central.shards[name][: hi - lo]
            parts.append(channels)
        summed = torch.cat([p.flatten() for p in parts]).to(self.topo.device)
        dist.all_reduce(summed)
        self.central.traffic.add(summed.numel() * summed.element_size())
        out, at = {}, 0
        for (block, _), channels in zip(self.outputs, parts, strict=True):
            col_sq, mean, sq_mean = summed[at : at + channels.numel()].cpu().view_as(channels)
            out[block.key] = unit_importance(block, fluctuation(col_sq, variance(mean, sq_mean)))
            at += channels.numel()
        return out

    def aggregate(self, specs: list[SubnetSpec]) -> None:
        """Holder mean of every group's subnet (and moments) into the central model."""
        for bucket in self.exchange.plan(self.entries, self.bucket_bytes):
            self.exchange.aggregate(bucket, self, specs)
        self.last_read = None

    # -- SubnetSource: what the exchanges read of the engine ---------------------------------------

    def shard_of(self, name: str) -> tuple[int, int]:
        """The flat range [start, stop) of this group's subnet tensor `name` that this rank sends."""
        if is_statistic(name):  # every rank of the group holds the group's average: each sends an equal part
            return even_range(self.storage.read_buffer(name).numel(), self.topo.ranks_per_group, self.topo.dp_rank)
        return self.storage.shard_of(name)

    def ranged_state(self, name: str) -> bool:
        """Whether this rank stores only its shard (`shard_of`) of the moments of `name` (statistics have none)."""
        return not is_statistic(name) and self.storage.ranged_state(name)

    def stored(self, entry: Entry) -> torch.Tensor:
        """A copy of this rank's stored range as the engine holds it now. After dispatch every rank of the
        group holds the same statistics, so they need no average inside the group (`read`)."""
        if is_statistic(entry.name):
            start, stop = self.shard_of(entry.name)
            return self.storage.read_buffer(entry.name).reshape(-1)[start:stop].float().clone()
        return self.storage.read_shard(entry.name, entry.moment).clone()

    def read_shard(self, entry: Entry) -> tuple[int, torch.Tensor]:
        """Where this rank's stored range of the subnet tensor starts, and its values (in place where
        possible); the parts of a tensor cut into several are read from the engine once."""
        if self.last_read is None or self.last_read[0] != entry.key:
            start, stop = self.shard_of(entry.name)
            if is_statistic(entry.name):
                values = self.read(entry).reshape(-1)[start:stop]
            else:
                values = self.storage.read_shard(entry.name, entry.moment)
            self.last_read = entry.key, (start, values)
        return self.last_read[1]

    def read(self, entry: Entry) -> torch.Tensor:
        if entry.moment:
            return self.storage.read_state(entry.name, entry.moment)
        if not is_statistic(entry.name):
            return self.storage.read(entry.name)
        # each dp rank saw different data: average the statistic inside the group first
        sub = self.storage.read_buffer(entry.name).to(self.topo.device, torch.float32, copy=True)
        dist.all_reduce(sub, group=self.topo.intra_group)
        self.central.traffic.add(sub.numel() * sub.element_size())
        return (sub / self.topo.ranks_per_group).cpu()
