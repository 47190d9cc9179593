"""Scoring helpers the pruning methods share: per-unit sums, standardisation, top-κ and the global ranking.

A score is a per-unit tensor of one partitioned group. Uniform methods keep the ⌈κ·n⌉ best units of
every group (`top_units`); adaptive ones rank all units of all groups at once under the uniform
methods' weight budget (`global_ranking`, FLAP's AL-AM).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from twist_scale.models import UnitBlock, units_to_keep
from twist_scale.subnet import SubnetSpec


def top(scores: torch.Tensor, kappa: float) -> tuple[int, ...]:
    """The ⌈κ·n⌉ highest-scoring unit ids of one group, ascending (ties: lower id first)."""
    order = torch.sort(-scores.double(), stable=True).indices
    return tuple(sorted(order[: units_to_keep(scores.numel(), kappa)].tolist()))


def top_units(unit_blocks: list[UnitBlock], kappa: float, score: Callable[[UnitBlock], torch.Tensor]) -> SubnetSpec:
    """Keep the ⌈κ·n⌉ highest-scoring units of every partitioned group."""
    return SubnetSpec({unit_block.key: top(score(unit_block), kappa) for unit_block in unit_blocks})


def per_unit(values: torch.Tensor, unit_block: UnitBlock, tensor_name: str) -> torch.Tensor:
    """Sum a per-channel vector (one entry per index along a unit axis) into one value per unit."""
    axis = next(a for a in unit_block.axes if a.name == tensor_name)
    return axis.per_unit(values, unit_block.num_units)


def owned_sum(unit_block: UnitBlock, elementwise: Callable[[str], torch.Tensor | None]) -> torch.Tensor:
    """Σ of an element-wise score over every element a unit owns: its slice of each tensor in the unit
    map (q/k/v rows and o columns, or a neuron's gate/up rows and down column). `elementwise` gives
    the score of a whole tensor by name, or None for a tensor it does not score."""
    total = torch.zeros(unit_block.num_units, dtype=torch.float64)
    for axis in unit_block.axes:
        values = elementwise(axis.name)
        if values is None:
            continue
        other = [d for d in range(values.dim()) if d != axis.axis]
        total += per_unit(values.sum(dim=other) if other else values, unit_block, axis.name)
    return total


def output_weight_columns(model: nn.Module, unit_block: UnitBlock) -> torch.Tensor:
    """The output projection's weight as (out features, unit channels), whatever its layout."""
    w = model.get_submodule(unit_block.output_module).weight.detach().float()
    return w if unit_block.output_input_axis == 1 else w.T


def unit_weight(model: nn.Module, unit_block: UnitBlock) -> int:
    """Parameters one unit of the group owns: its share of every sliced parameter tensor."""
    params = dict(model.named_parameters())
    return sum(
        params[a.name].numel() // params[a.name].shape[a.axis] * a.unit_width
        for a in unit_block.axes
        if a.name in params
    )


def _nearest_prefix(weights: torch.Tensor, budget: float, at_least: int) -> int:
    """How many leading entries to keep: the prefix (≥ at_least) whose total weight is nearest the budget."""
    gap = (weights.cumsum(0) - budget).abs()
    gap[: at_least - 1] = float("inf")
    return int(torch.argmin(gap)) + 1  # argmin: the first of equal gaps, the smaller model


def global_ranking(
    model: nn.Module, unit_blocks: list[UnitBlock], kappa: float, score: Callable[[UnitBlock], torch.Tensor]
) -> SubnetSpec:
    """One ranking of every partitioned unit, attention and MLP, across layers (FLAP's AL-AM).

    Units are ranked by their (standardised) score and the prefix of the ranking whose parameter
    count is nearest the budget B = Σ_groups ⌈κ·n⌉ · (unit weight) is kept — B is what a uniform
    method keeps, so widths adapt per layer and kind at the same size. Ties: group order, then lower
    id. Every group keeps at least one unit, as under `units_to_keep` (a GPT-2 block cannot run at
    zero width): if the ranking leaves a group empty, each group's best unit is kept first and the
    rest of the ranking fills the same budget.
    """
    groups = unit_blocks
    sizes = [unit_weight(model, unit_block) for unit_block in groups]
    budget = float(
        sum(units_to_keep(unit_block.num_units, kappa) * w for unit_block, w in zip(groups, sizes, strict=True))
    )
    weight = torch.cat(
        [
            torch.full((unit_block.num_units,), w, dtype=torch.float64)
            for unit_block, w in zip(groups, sizes, strict=True)
        ]
    )
    group_of = torch.cat([torch.full((unit_block.num_units,), g) for g, unit_block in enumerate(groups)])
    unit_id = torch.cat([torch.arange(unit_block.num_units) for unit_block in groups])
    scores = torch.cat([score(unit_block) for unit_block in groups])
    order = torch.sort(-scores, stable=True).indices
    kept = order[: _nearest_prefix(weight[order], budget, 1)]
    if group_of[kept].unique().numel() < len(groups):
        best = torch.tensor([int(order[group_of[order] == g][0]) for g in range(len(groups))])
        order = torch.cat([best, order[~torch.isin(order, best)]])
        kept = order[: _nearest_prefix(weight[order], budget, len(groups))]
    return SubnetSpec(
        {
            unit_block.key: tuple(sorted(unit_id[kept[group_of[kept] == g]].tolist()))
            for g, unit_block in enumerate(groups)
        }
    )
