"""Subnets as plain data: which units each group keeps, how they are drawn, how tensors are sliced.

Sampling is a pure function of (seed, round): every rank computes every group's spec, so holder
counts are local knowledge and no mask is ever communicated.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping, Sequence
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


def core_size(num_units: int, keeps: Sequence[int]) -> int:
    """How many top-ranked units every group can keep while the groups still cover every unit: the rest,
    n - c, must fit in what the groups have left, Σ(keep_g - c) >= n - c, so c <= (Σ keep - n) / (G - 1).
    0 where the keeps leave no slack (Σκ = 1: a partition); the smallest keep where one group trains the full
    width (a sandwich)."""
    if len(keeps) == 1:
        return keeps[0]
    return max(0, min(min(keeps), (sum(keeps) - num_units) // (len(keeps) - 1)))


@dataclass(frozen=True)
class SubnetSampler:
    """Draws every group's subnet; group g keeps a fraction kappas[g] of each partitioned block's units.

    'independent': every round a fresh coverage draw. 'nested': group g always keeps the first ⌈κ_g·n⌉
    units (unit_order sorted them). 'rewired': every group keeps the `core_size` most important units of
    the round (`importance`, ranked from the central model's statistics), the rest are a coverage draw, so
    the units that matter train in every group (DynaBERT's rewiring) and every unit still trains somewhere.
    """

    unit_blocks: tuple[UnitBlock, ...]  # partitioned unit blocks only
    kappas: tuple[float, ...]  # one per group: equal for plain TwIST, unequal for mixed kappa or a sandwich
    seed: int
    sampling: str = "independent"  # config.TwistConfig.sampling

    def specs(self, round_: int, importance: Mapping[tuple[int, str], torch.Tensor] | None = None) -> list[SubnetSpec]:
        """Every group's spec for this round; a pure function of (seed, round, layer, kind) and, rewired, of
        the units' `importance` (per block; absent or without spread: no unit is preferred)."""
        kept: list[dict[tuple[int, str], torch.Tensor]] = [{} for _ in self.kappas]
        drawn: dict[tuple[int, str], torch.Tensor] = {}
        for unit_block in self.unit_blocks:
            keeps = [units_to_keep(unit_block.num_units, kappa) for kappa in self.kappas]
            if self.sampling == "nested":
                for g, keep in enumerate(keeps):
                    kept[g][unit_block.key] = torch.arange(keep)
                continue
            from twist_scale.coverage import kept_ids  # numba: imported (1 s) only by runs that draw

            seed = f"twist:{self.seed}:{round_}:{unit_block.layer}:{unit_block.kind}"
            scores = (importance or {}).get(unit_block.key)
            ranked = self.sampling == "rewired" and scores is not None and bool(scores.std() > 0)
            core = core_size(unit_block.num_units, keeps) if ranked else 0
            held = drawn[unit_block.key] = _draw_around_core(seed, unit_block.num_units, keeps, scores, core)
            for g, ids in enumerate(kept_ids(held)):
                kept[g][unit_block.key] = ids
        return [SubnetSpec(k, drawn or None) for k in kept]


def _draw_around_core(
    seed: str, num_units: int, keeps: list[int], scores: torch.Tensor | None, core: int
) -> torch.Tensor:
    """(G, n) bool: the `core` highest-scoring units (ties: lower id) in every group, the coverage draw over
    the other units for the rest of each keep. Without a core, the coverage draw itself."""
    from twist_scale.coverage import coverage_draw

    if core == 0:
        return coverage_draw(seed, num_units, keeps)
    order = torch.sort(-scores.double(), stable=True).indices
    rest = order[core:].sort().values
    held = torch.zeros(len(keeps), num_units, dtype=torch.bool)
    held[:, order[:core]] = True
    held[:, rest] = coverage_draw(seed, len(rest), [keep - core for keep in keeps])
    return held


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
