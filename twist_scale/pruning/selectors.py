"""How each pruning method picks the units a κ-subnet keeps: one function of `PruneInputs` each.

Apart from the registry (`methods.py`), which is what export and evaluation read (what a method needs,
its calibration default, whether it is seeded), so the algorithms change without touching it.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import TypeVar

import torch
from torch import nn

from twist_scale.importance import fluctuation, standardized, unit_importance
from twist_scale.models import UnitBlock, units_to_keep
from twist_scale.pruning.calibration import ActivationStats, collect_activation_stats
from twist_scale.pruning.scores import (
    global_ranking,
    output_weight_columns,
    owned_sum,
    per_unit,
    top,
    top_units,
)
from twist_scale.subnet import SubnetSampler, SubnetSpec

T = TypeVar("T")


@dataclass(frozen=True)
class PruneInputs:
    """Everything a method may look at; what a method reads from calibration text, the registry says."""

    model: nn.Module  # full width, not modified
    unit_blocks: list[UnitBlock]  # the partitioned unit blocks: the ones a subnet shrinks
    kappa: float
    seed: int = 0
    stats: ActivationStats | None = None  # PruneMethod.needs_stats (or needs_training_stats)
    grads: dict[str, torch.Tensor] | None = None  # PruneMethod.needs_grads: full-width, by parameter name
    calibration: list[torch.Tensor] | None = None  # PruneMethod.needs_batches: the batches of token ids
    subnet_loss: Callable[[SubnetSpec], float] | None = None  # needs_subnet_loss: calibration loss, as exported


def _squared_weights(model: nn.Module) -> Callable[[str], torch.Tensor | None]:
    """Element-wise w² of a parameter by name (None for a name that is not a parameter)."""
    params = dict(model.named_parameters())

    def square(name: str) -> torch.Tensor | None:
        return params[name].detach().double() ** 2 if name in params else None

    return square


def select_random(inputs: PruneInputs) -> SubnetSpec:
    """TwIST's zero-cost export: a seeded uniform draw, as in training (one group, round = seed)."""
    return SubnetSampler(tuple(inputs.unit_blocks), (inputs.kappa,), inputs.seed).specs(inputs.seed)[0]


def select_prefix(inputs: PruneInputs) -> SubnetSpec:
    """The first ⌈κ·n⌉ unit ids of every unit block: under nested sampling, the subnet a group at κ trained
    (units sorted by weight norm at the start); in any other run, one arbitrary fixed draw."""
    return SubnetSpec(
        {block.key: tuple(range(units_to_keep(block.num_units, inputs.kappa))) for block in inputs.unit_blocks}
    )


BEST_OF = 8  # candidates `random_best` scores: the draws a seed owns


def select_best_draw(inputs: PruneInputs) -> SubnetSpec:
    """Of the draws `random` gives for seeds BEST_OF·seed .. BEST_OF·seed + BEST_OF - 1 (seed 0: random's
    seeds 0..7), the one with the lowest calibration loss; ties go to the lower seed."""
    loss = _needs(inputs.subnet_loss, "the calibration loss of a subnet")
    first = BEST_OF * inputs.seed
    draws = [select_random(replace(inputs, seed=s)) for s in range(first, first + BEST_OF)]
    return min(draws, key=loss)


def select_magnitude(inputs: PruneInputs) -> SubnetSpec:
    """Data-free: the squared L2 norm of all weights a unit owns (q/k/v rows and o columns, or one neuron)."""
    square = _squared_weights(inputs.model)
    return top_units(inputs.unit_blocks, inputs.kappa, lambda block: owned_sum(block, square))


def _needs(value: T | None, what: str) -> T:
    """The input a method reads, or an error that says where it comes from."""
    if value is None:
        raise ValueError(f"this pruning method needs {what} (pass calibration text)")
    return value


@contextmanager
def _without_dropped(model: nn.Module, unit_blocks: list[UnitBlock], spec: SubnetSpec) -> Iterator[None]:
    """Run the full-width model as if the spec's dropped units were removed, with no correction: their
    channels at the output projection's input are zeroed, which is what slicing them away gives."""
    handles = []
    for block in unit_blocks:
        module = model.get_submodule(block.output_module)
        keep = module.weight.new_zeros(module.weight.shape[block.output_input_axis])
        keep[block.output_axis.index(spec.units(block))] = 1.0
        handles.append(module.register_forward_pre_hook(lambda m, args, keep=keep: (args[0] * keep, *args[1:])))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def select_wanda_sp(inputs: PruneInputs) -> SubnetSpec:
    """Wanda-sp (structured Wanda, FLAP's `prune_wanda_sp`): Σ_j Σ_i |W_ij| · ‖X_j‖ over a unit's
    input channels j of the output projection, ⌈κ·n⌉ units per unit block.

    Layer by layer, as the reference: X is measured on the calibration batches with every earlier
    partitioned layer already pruned to its kept units (removed, not compensated), attention and MLP
    of one layer in the same pass. So a layer is scored on the inputs it sees once the earlier ones
    have lost their units; those depend on κ, so the passes run per call, one per partitioned layer.
    """
    batches = _needs(inputs.calibration, "calibration batches")
    kept: dict[tuple[int, str], tuple[int, ...]] = {}
    for layer in sorted({block.layer for block in inputs.unit_blocks}):
        in_layer = [block for block in inputs.unit_blocks if block.layer == layer]
        done = [block for block in inputs.unit_blocks if block.key in kept]
        with _without_dropped(inputs.model, done, SubnetSpec(kept)):
            stats = collect_activation_stats(inputs.model, in_layer, batches)
        for block in in_layer:
            w = output_weight_columns(inputs.model, block)
            channel = w.abs().sum(0).double() * stats.sq_mean[block.output_module].double().sqrt()
            kept[block.key] = top(per_unit(channel, block, f"{block.output_module}.weight"), inputs.kappa)
    return SubnetSpec(kept)


def select_taylor(inputs: PruneInputs) -> SubnetSpec:
    """LLM-Pruner's block-wise Taylor importance ('param_first', group reduction 'sum'): Σ |w · ∂L/∂w|
    over every parameter a unit owns, ⌈κ·n⌉ units per unit block. |w · ∂L/∂w| is the first-order estimate
    of how much the loss changes when w is set to zero, so a unit scores what removing it costs."""
    grads = _needs(inputs.grads, "loss gradients on calibration text")
    params = dict(inputs.model.named_parameters())

    def saliency(name: str) -> torch.Tensor | None:
        return (params[name].detach().double() * grads[name].double()).abs() if name in grads else None

    return top_units(inputs.unit_blocks, inputs.kappa, lambda block: owned_sum(block, saliency))


def _fluctuation(inputs: PruneInputs, block: UnitBlock) -> torch.Tensor:
    """FLAP's WIFV per unit channel j of the output projection: Var(X_j) · ‖W_:,j‖² — how much the
    output moves when channel j is removed and its mean is compensated by a bias (export, 'mean')."""
    stats = _needs(inputs.stats, "calibration statistics")
    w = output_weight_columns(inputs.model, block)
    return fluctuation((w**2).sum(0), stats.variance(block.output_module))


def _importance(inputs: PruneInputs, block: UnitBlock) -> torch.Tensor:
    return unit_importance(block, _fluctuation(inputs, block))


def select_flap_uniform(inputs: PruneInputs) -> SubnetSpec:
    """FLAP's uniform variant (UL-UM): Σ_j WIFV_j over a unit's channels, ⌈κ·n⌉ units per unit block."""
    return top_units(
        inputs.unit_blocks,
        inputs.kappa,
        lambda block: per_unit(_fluctuation(inputs, block), block, f"{block.output_module}.weight"),
    )


def select_flap(inputs: PruneInputs) -> SubnetSpec:
    """FLAP's default (AL-AM): the global ranking of standardised WIFV scores (`scores.global_ranking`)."""
    return global_ranking(inputs.model, inputs.unit_blocks, inputs.kappa, functools.partial(_importance, inputs))


def select_ranked(inputs: PruneInputs) -> SubnetSpec:
    """The ⌈κ·n⌉ most important units of every block by the statistics kept in training (`importance`): under
    rewired sampling, the units every group trained; `adaptive_stats` reads the same ranking at adaptive widths."""
    return top_units(inputs.unit_blocks, inputs.kappa, functools.partial(_importance, inputs))


def select_adaptive_magnitude(inputs: PruneInputs) -> SubnetSpec:
    """Zero-cost and data-free, with adaptive widths: each unit's owned squared weight norm (as
    `magnitude`), standardised within its unit block so layers and kinds share one scale, then the same
    global ranking under the same weight budget as FLAP AL-AM."""
    square = _squared_weights(inputs.model)
    return global_ranking(
        inputs.model, inputs.unit_blocks, inputs.kappa, lambda block: standardized(owned_sum(block, square))
    )
