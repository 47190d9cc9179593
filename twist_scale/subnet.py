"""Subnets as plain data: which units each group keeps, how they are drawn, how tensors are sliced.

Sampling is a pure function of (seed, round): every rank computes every group's spec, so holder
counts are local knowledge and no mask is ever communicated.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from twist_scale.models import AxisSlice, UnitBlock, units_to_keep
from twist_scale.models.widths import fit_modules_to_weights


@dataclass(frozen=True, eq=False)
class SubnetSpec:
    """Kept unit ids (ascending, int64) per partitioned (layer, kind); layers not listed are kept whole."""

    kept: Mapping[tuple[int, str], torch.Tensor]
    # the round's (G, n) bool draw of each block, shared by the G specs a sampler made together: what the
    # exchange needs, so it never rebuilds it from the ids (absent for specs built otherwise)
    drawn: Mapping[tuple[int, str], torch.Tensor] | None = None

    def __post_init__(self) -> None:
        ids = {key: torch.as_tensor(units, dtype=torch.long) for key, units in self.kept.items()}
        object.__setattr__(self, "kept", ids)

    def units(self, group: UnitBlock) -> torch.Tensor:
        ids = self.kept.get(group.key)
        return torch.arange(group.num_units) if ids is None else ids

    def ids(self) -> dict[tuple[int, str], tuple[int, ...]]:
        """The kept ids as plain tuples: for records and comparisons."""
        return {key: tuple(units.tolist()) for key, units in self.kept.items()}

    def __eq__(self, other: object) -> bool:
        return isinstance(other, SubnetSpec) and self.ids() == other.ids()

    def __hash__(self) -> int:
        return hash(self.fingerprint())

    def fingerprint(self) -> bytes:
        digest = hashlib.sha256()
        for key in sorted(self.kept):
            digest.update(repr(key).encode())
            digest.update(self.kept[key].to(torch.int32).numpy().tobytes())
        return digest.digest()


def default_shared_layers(num_layers: int) -> list[int]:
    """The paper keeps the first two and last two layers whole; tiny models partition everything."""
    return [0, 1, num_layers - 2, num_layers - 1] if num_layers >= 6 else []


def partitioned_blocks(unit_blocks: list[UnitBlock], shared_layers: Iterable[int]) -> list[UnitBlock]:
    shared = set(shared_layers)
    return [g for g in unit_blocks if g.layer not in shared]


@dataclass(frozen=True)
class SubnetSampler:
    """Draws every group's subnet; group g keeps a fraction kappas[g] of each partitioned block's units."""

    unit_blocks: tuple[UnitBlock, ...]  # partitioned unit blocks only
    kappas: tuple[float, ...]  # one per group: equal for plain TwIST, unequal for mixed kappa or a sandwich
    seed: int
    nested: bool = False  # every round, group g keeps the first ⌈κ_g·n⌉ units (unit_order sorted them)

    def specs(self, round_: int) -> list[SubnetSpec]:
        """Every group's spec for this round; a pure function of (seed, round, layer, kind)."""
        kept: list[dict[tuple[int, str], torch.Tensor]] = [{} for _ in self.kappas]
        drawn: dict[tuple[int, str], torch.Tensor] = {}
        for unit_block in self.unit_blocks:
            keeps = [units_to_keep(unit_block.num_units, kappa) for kappa in self.kappas]
            if self.nested:
                for g, keep in enumerate(keeps):
                    kept[g][unit_block.key] = torch.arange(keep)
                continue
            from twist_scale.coverage import coverage_draw, kept_ids  # numba: imported (1 s) only by runs that draw

            seed = f"twist:{self.seed}:{round_}:{unit_block.layer}:{unit_block.kind}"
            held = drawn[unit_block.key] = coverage_draw(seed, unit_block.num_units, keeps)
            for g, ids in enumerate(kept_ids(held)):
                kept[g][unit_block.key] = ids
        return [SubnetSpec(k, drawn or None) for k in kept]


def slice_tensor(full: torch.Tensor, axis: AxisSlice, units: torch.Tensor) -> torch.Tensor:
    return full.index_select(axis.axis, axis.index(units))


def scatter_tensor(sub: torch.Tensor, full_shape: torch.Size, axis: AxisSlice, units: torch.Tensor) -> torch.Tensor:
    """The sub tensor placed in full coordinates (zeros elsewhere): M ⊙ θ for aggregation."""
    out = sub.new_zeros(full_shape)
    return out.index_copy_(axis.axis, axis.index(units), sub)


def unit_mask(full_shape: torch.Size, axis: AxisSlice, units: torch.Tensor) -> torch.Tensor:
    shape = [1] * len(full_shape)
    shape[axis.axis] = full_shape[axis.axis]
    mask = torch.zeros(full_shape[axis.axis])
    mask[axis.index(units)] = 1.0
    return mask.view(shape).expand(full_shape)


def axis_of(unit_blocks: Iterable[UnitBlock]) -> dict[str, tuple[UnitBlock, AxisSlice]]:
    """tensor name -> (its unit block, its unit axis) for every unit-owned tensor."""
    return {ax.name: (unit_block, ax) for unit_block in unit_blocks for ax in unit_block.axes}


@torch.no_grad()
def apply_subnet_shapes(model: nn.Module, unit_blocks: list[UnitBlock], spec: SubnetSpec) -> None:
    """Shrink the model in place to the spec's subnet: smaller dense tensors, not masks.

    Values are sliced from the current (full) values, so this is also the reference export.
    """
    tensors = dict(model.named_parameters()) | dict(model.named_buffers())
    for name, (unit_block, axis) in axis_of(unit_blocks).items():
        if name not in tensors:
            continue
        module_name, _, attr = name.rpartition(".")
        module = model.get_submodule(module_name)
        sub = slice_tensor(tensors[name].data, axis, spec.units(unit_block))
        if isinstance(tensors[name], nn.Parameter):
            setattr(module, attr, nn.Parameter(sub, requires_grad=tensors[name].requires_grad))
        else:
            setattr(module, attr, sub)
    fit_modules_to_weights(model)


@torch.no_grad()
def apply_unit_masks(model: nn.Module, unit_blocks: list[UnitBlock], spec: SubnetSpec) -> None:
    """Zero every unit the spec drops (full shapes kept): the test oracle for the sliced model."""
    params = dict(model.named_parameters())
    for name, (unit_block, axis) in axis_of(unit_blocks).items():
        if name in params:
            params[name].mul_(unit_mask(params[name].shape, axis, spec.units(unit_block)))
