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

from twist_scale.aggregate import CentralShards, FullWidthExchange, Traffic
from twist_scale.config import DEFAULT_BUCKET_MB
from twist_scale.correction import ACT_MEAN, Correction, is_statistic
from twist_scale.engines.base import even_range
from twist_scale.engines.storage import EngineStorage
from twist_scale.exchange_plan import Entry
from twist_scale.models import UnitBlock
from twist_scale.packing import PackedExchange
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
    exchange: packed (only held elements travel) or full-width (the reference)."""

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
        exchange: PackedExchange | FullWidthExchange | None = None,
        bucket_mb: float = DEFAULT_BUCKET_MB,
    ) -> None:
        self.central, self.storage, self.topo = central, storage, topo
        self.correction, self.reset_moments, self.moments = correction, reset_moments, moments
        self.exchange = exchange or PackedExchange(central)
        self.bucket_bytes = int(bucket_mb * 2**20)
        unit_axes = axis_of(unit_blocks)
        self.entries = []
        for name, shape in central.shapes.items():
            unit = unit_axes.get(name)
            outputs = unit is not None and name == unit[0].output_axis.name
            whole = is_statistic(name) or (outputs and correction.needs_full_weight)
            self.entries.append(Entry(name, shape, unit, whole))
            if not is_statistic(name):
                self.entries += [Entry(f"{name}@{key}", shape, unit) for key in moments]
        if isinstance(self.exchange, PackedExchange):
            self.exchange.learn_layout(self.entries, self._shard_of, self._ranged_state)

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
        means: dict[str, torch.Tensor] = {}
        present = [e for e in self.entries if e.name in self.central.shards]  # no moments before the first aggregation
        by_name = {e.name: e for e in present}
        for bucket in self.exchange.plan(present, self.bucket_bytes):
            # tensors in entry order, each once its last part arrived: the statistics come first, so
            # the means are here before their output weights
            for name, value in self.exchange.dispatch(bucket, specs).items():
                self._write(by_name[name], value, spec, means)
        if self.reset_moments:
            self.storage.reset_optimizer_state()
        if self.exchange.sends_changes:
            self.exchange.dispatched = {e.name: self._dispatched_shard(e) for e in present}

    def _dispatched_shard(self, entry: Entry) -> torch.Tensor:
        """A copy of what aggregation will read of `entry`, as dispatch just wrote it. Every rank of the
        group holds the same statistics now, so they need no average inside the group (`_read`)."""
        name, _, key = entry.name.partition("@")
        if is_statistic(name):
            start, stop = self._shard_of(name)
            return self.storage.read_buffer(name).reshape(-1)[start:stop].float().clone()
        return self.storage.read_shard(name, key).clone()

    def _write(self, entry: Entry, value: torch.Tensor, spec: SubnetSpec, means: dict[str, torch.Tensor]) -> None:
        name, _, key = entry.name.partition("@")
        sub = slice_tensor(value, entry.unit[1], entry.units(spec)) if entry.whole and entry.unit else value
        if self.exchange.receives_shard(entry):  # this rank's flat range of the subnet tensor
            self.storage.write_shard(name, key, value)
        elif key:
            self.storage.write_state(name, key, sub)
        elif is_statistic(name):
            if name.endswith(ACT_MEAN):
                means[name.rpartition(".")[0]] = value
            self.storage.write_buffer(name, sub)
        else:
            self.storage.write(name, sub)
        if not key and entry.unit is not None and name == entry.unit[0].output_axis.name:
            unit_block = entry.unit[0]
            full = value if entry.whole else None
            self.correction.dispatch(
                self.storage.submodule(unit_block.output_module), unit_block, spec.units(unit_block), full, means
            )

    def aggregate(self, specs: list[SubnetSpec]) -> None:
        """Holder mean of every group's subnet (and moments) into the central model."""
        last: dict[str, object] = {}  # a tensor cut into parts is read from the engine once
        reader = self._read_shard if isinstance(self.exchange, PackedExchange) else self._read

        def read(entry: Entry):  # noqa: ANN202 - the exchange's own reader's result
            if entry.name not in last:
                last.clear()
                last[entry.name] = reader(entry)
            return last[entry.name]

        for bucket in self.exchange.plan(self.entries, self.bucket_bytes):
            self.exchange.aggregate(bucket, read, specs)

    def _shard_of(self, name: str) -> tuple[int, int]:
        """The flat range [start, stop) of this group's subnet tensor `name` that this rank sends."""
        if is_statistic(name):  # every rank of the group holds the group's average: each sends an equal part
            return even_range(self.storage.read_buffer(name).numel(), self.topo.ranks_per_group, self.topo.dp_rank)
        return self.storage.shard_of(name)

    def _ranged_state(self, name: str) -> bool:
        """Whether this rank stores only its shard (`_shard_of`) of the moments of `name` (statistics have none)."""
        return not is_statistic(name) and self.storage.ranged_state(name)

    def _read_shard(self, entry: Entry) -> tuple[int, torch.Tensor]:
        """Where this rank's stored range of the subnet tensor starts, and its values (in place where possible)."""
        name, _, key = entry.name.partition("@")
        start, stop = self._shard_of(name)
        if is_statistic(name):
            return start, self._read(entry).reshape(-1)[start:stop]
        return start, self.storage.read_shard(name, key)

    def _read(self, entry: Entry) -> torch.Tensor:
        name, _, key = entry.name.partition("@")
        if key:
            return self.storage.read_state(name, key)
        if not is_statistic(name):
            return self.storage.read(name)
        # each dp rank saw different data: average the statistic inside the group first
        sub = self.storage.read_buffer(name).to(self.topo.device, torch.float32, copy=True)
        dist.all_reduce(sub, group=self.topo.intra_group)
        self.central.traffic.add(sub.numel() * sub.element_size())
        return (sub / self.topo.ranks_per_group).cpu()
