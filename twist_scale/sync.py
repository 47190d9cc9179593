"""Dispatch (central model → one group's engine) and aggregation (engines → central model).

Both stream one tensor at a time, so a rank holds at most one full-width tensor beside its shard
of the central model and its group's subnet.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from twist_scale.aggregate import CentralModel, holder_counts, masked_contribution
from twist_scale.correction import ACT_MEAN, dropped_contribution, set_scale, set_shift
from twist_scale.engines.base import Engine
from twist_scale.models import UnitGroup
from twist_scale.subnet import SubnetSpec, axis_of, slice_tensor
from twist_scale.topology import Topology


def central_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """What the central model holds: every parameter and the unit activation means (if any).

    Means come first: dispatch needs them before the output weights whose dropped units they
    stand in for.
    """
    tensors = dict(model.named_parameters()) | {n: b for n, b in model.named_buffers() if n.endswith(ACT_MEAN)}
    return {n: tensors[n] for n in sorted(tensors, key=lambda n: not n.endswith(ACT_MEAN))}


class RoundSync:
    def __init__(
        self,
        central: CentralModel,
        engine: Engine,
        unit_groups: list[UnitGroup],
        topo: Topology,
        moments: tuple[str, ...],
        correction: str,
        reset_moments: bool,
    ) -> None:
        self.central, self.engine, self.topo = central, engine, topo
        self.unit_groups = unit_groups
        self.unit_axes = axis_of(unit_groups)
        self.moments, self.correction, self.reset_moments = moments, correction, reset_moments
        self.names = list(central.shapes)

    def _sub(self, full: torch.Tensor, name: str, spec: SubnetSpec) -> torch.Tensor:
        unit = self.unit_axes.get(name)
        return full if unit is None else slice_tensor(full, unit[1], spec.units(unit[0]))

    def dispatch(self, spec: SubnetSpec) -> None:
        """Slice the central model into this group's engine (weights, moments, corrections)."""
        means: dict[str, torch.Tensor] = {}
        for name in self.names:
            full = self.central.gather(name)
            if name.endswith(ACT_MEAN):
                means[name.rpartition(".")[0]] = full
                self.engine.module.get_buffer(name).copy_(self._sub(full, name, spec))
                continue
            self.engine.write(name, self._sub(full, name, spec))
            for key in self.moments:
                if f"{name}@{key}" in self.central.shards:  # before the first aggregation: fresh zeros
                    self.engine.write_state(name, key, self._sub(self.central.gather(f"{name}@{key}"), name, spec))
            unit = self.unit_axes.get(name)
            if unit is not None and name == unit[0].output_axis.name and unit[0].output_module in means:
                ug = unit[0]
                set_shift(
                    self.engine.module, ug, dropped_contribution(full, means[ug.output_module], ug, spec.units(ug))
                )
        if self.reset_moments:
            self.engine.reset_optimizer_state()
        set_scale(self.engine.module, self.unit_groups, spec, self.correction)

    def aggregate(self, specs: list[SubnetSpec]) -> None:
        """Masked reduce-scatter of every group's subnet (and moments) into the central model."""
        spec = specs[self.topo.group]
        for name in self.names:
            unit = self.unit_axes.get(name)
            shape = self.central.shapes[name]
            counts = holder_counts(shape, unit, specs)
            if name.endswith(ACT_MEAN):  # each dp rank saw different data: average inside the group first
                sub = self.engine.module.get_buffer(name).detach().to(self.topo.device, torch.float32, copy=True)
                dist.all_reduce(sub, group=self.topo.intra_group)
                sub /= self.topo.ranks_per_group
                self.central.aggregate(name, masked_contribution(sub, shape, unit, spec), counts)
                continue
            self.central.aggregate(name, masked_contribution(self.engine.read(name), shape, unit, spec), counts)
            for key in self.moments:
                moment = self.engine.read_state(name, key)
                self.central.aggregate(f"{name}@{key}", masked_contribution(moment, shape, unit, spec), counts)
