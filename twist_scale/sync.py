"""Synchronisation between the groups' engines: TwIST's dispatch and aggregation, or nothing (dense).

SubnetSync dispatches (central model → one group's engine) and aggregates (engines → central model).
Both stream one tensor at a time, so a rank holds at most one full-width tensor beside its shard of
the central model and its group's subnet. DenseSync is the same interface for plain data
parallelism, where the engine already holds the whole model, so the loop has no dense branches.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator

import torch
import torch.distributed as dist
from torch import nn

from twist_scale.aggregate import CentralShards, holder_counts, masked_contribution
from twist_scale.config import RunConfig
from twist_scale.correction import ACT_MEAN, Correction, correction_of, is_statistic
from twist_scale.engines import build_engine
from twist_scale.engines.base import Engine, moment_keys
from twist_scale.models import UnitBlock
from twist_scale.subnet import SubnetSpec, apply_subnet_shapes, axis_of, slice_tensor
from twist_scale.topology import Topology


def central_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """What the central model holds: every parameter and the unit activation statistics (if any).

    Statistics come first: dispatch needs the means before the output weights whose dropped units
    they stand in for.
    """
    tensors = dict(model.named_parameters()) | {n: b for n, b in model.named_buffers() if is_statistic(n)}
    return {n: tensors[n] for n in sorted(tensors, key=lambda n: not is_statistic(n))}


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


def central_from_model(model: nn.Module, topo: Topology) -> CentralShards:
    """This rank's pieces of the full-width model, taken before the model is shrunk to a subnet."""
    tensors = central_tensors(model)
    central = CentralShards(topo, {n: t.shape for n, t in tensors.items()})
    for name, t in tensors.items():
        central.set_full(name, t.data)
    return central


def build_engine_and_sync(
    model: nn.Module, cfg: RunConfig, topo: Topology, unit_blocks: list[UnitBlock], first_specs: list[SubnetSpec]
) -> tuple[Engine, DenseSync | SubnetSync]:
    """Wrap the full-width `model` in the run's engine, and the synchronisation its groups need.

    TwIST keeps this rank's pieces of the full model as the central model, then shrinks the model to
    the group's first subnet before the engine shards it; dense data parallelism keeps it whole.
    """
    central = None if cfg.is_dense else central_from_model(model, topo)
    if central is not None:
        apply_subnet_shapes(model, unit_blocks, first_specs[topo.group])
    engine = build_engine(model, cfg, topo)
    if central is None:
        return engine, DenseSync(engine)
    aggregate_moments = cfg.twist.optimizer_state == "aggregate"
    moments = moment_keys(cfg.optim) if aggregate_moments else ()
    correction = correction_of(cfg.twist.correction)
    sync = SubnetSync(central, engine, unit_blocks, topo, moments, correction, not aggregate_moments)
    return engine, sync


class DenseSync:
    """Data parallelism: one group holds the whole model, so there is nothing to dispatch or aggregate."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def dispatch(self, spec: SubnetSpec) -> None: ...

    def aggregate(self, specs: list[SubnetSpec]) -> None: ...

    def full_state(self) -> Iterator[tuple[str, torch.Tensor]]:
        """The full model, one tensor at a time (collective within the group)."""
        for name in self.engine.params:
            yield name, self.engine.read(name)

    def local_tensors(self) -> Iterable[torch.Tensor]:
        return self.engine.local_tensors()

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {}  # the engine's own checkpoint holds the model

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None: ...

    def take_bytes(self) -> int:
        return 0


class SubnetSync:
    """TwIST's synchronisation: dispatch slices each group's subnet out of the sharded central model;
    aggregation averages the groups' subnets back into it (masked reduce-scatter)."""

    def __init__(
        self,
        central: CentralShards,
        engine: Engine,
        unit_blocks: list[UnitBlock],
        topo: Topology,
        moments: tuple[str, ...],
        correction: Correction,
        reset_moments: bool,
    ) -> None:
        self.central, self.engine, self.topo = central, engine, topo
        self.unit_blocks = unit_blocks
        self.unit_axes = axis_of(unit_blocks)
        self.moments, self.correction, self.reset_moments = moments, correction, reset_moments
        self.names = list(central.shapes)

    def full_state(self) -> Iterator[tuple[str, torch.Tensor]]:
        """The full-width central model, one tensor at a time (collective over the world)."""
        for name in self.names:
            yield name, self.central.gather(name)

    def local_tensors(self) -> Iterable[torch.Tensor]:
        return self.central.shards.values()

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.central.shards

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.central.shards = state

    def take_bytes(self) -> int:
        """Bytes this rank moved since the last call (collective payloads, for tracking)."""
        sent, self.central.bytes_sent = self.central.bytes_sent, 0
        return sent

    def _sub(self, full: torch.Tensor, name: str, spec: SubnetSpec) -> torch.Tensor:
        unit = self.unit_axes.get(name)
        return full if unit is None else slice_tensor(full, unit[1], spec.units(unit[0]))

    def dispatch(self, spec: SubnetSpec) -> None:
        """Slice the central model into this group's engine (weights, moments, corrections)."""
        means: dict[str, torch.Tensor] = {}
        for name in self.names:
            full = self.central.gather(name)
            if is_statistic(name):
                if name.endswith(ACT_MEAN):
                    means[name.rpartition(".")[0]] = full
                self.engine.write_buffer(name, self._sub(full, name, spec))
                continue
            self.engine.write(name, self._sub(full, name, spec))
            for key in self.moments:
                if f"{name}@{key}" in self.central.shards:  # before the first aggregation: fresh zeros
                    self.engine.write_state(name, key, self._sub(self.central.gather(f"{name}@{key}"), name, spec))
            unit = self.unit_axes.get(name)
            if unit is not None and name == unit[0].output_axis.name:  # statistics came first: means are here
                ug = unit[0]
                self.correction.dispatch(self.engine.submodule(ug.output_module), ug, spec.units(ug), full, means)
        if self.reset_moments:
            self.engine.reset_optimizer_state()

    def aggregate(self, specs: list[SubnetSpec]) -> None:
        """Masked reduce-scatter of every group's subnet (and moments) into the central model."""
        spec = specs[self.topo.group]
        for name in self.names:
            unit = self.unit_axes.get(name)
            shape = self.central.shapes[name]
            counts = holder_counts(shape, unit, specs)
            if is_statistic(name):  # each dp rank saw different data: average inside the group first
                sub = self.engine.read_buffer(name).to(self.topo.device, torch.float32, copy=True)
                dist.all_reduce(sub, group=self.topo.intra_group)
                sub /= self.topo.ranks_per_group
                self.central.aggregate(name, masked_contribution(sub, shape, unit, spec), counts)
                continue
            self.central.aggregate(name, masked_contribution(self.engine.read(name), shape, unit, spec), counts)
            for key in self.moments:
                moment = self.engine.read_state(name, key)
                self.central.aggregate(f"{name}@{key}", masked_contribution(moment, shape, unit, spec), counts)
