"""Which units a κ-subnet keeps: a registry of pruning methods with one signature (wanda's discipline).

Every method maps a `PruneInputs` to a `SubnetSpec` over the partitioned unit blocks, so TwIST's
zero-cost export (`random`) and the post-hoc baselines (`magnitude`, `wanda_sp`, `taylor`, `flap`,
`flap_uniform`) go through the same exporter and the same perplexity protocol. Most methods keep
⌈κ·n⌉ units in every partitioned unit block, so their exports have the same widths. `flap` is FLAP's
own default (AL-AM): one global ranking over all layers and both kinds, so widths differ per layer,
at the same total weight count as the uniform methods; `flap_uniform` is FLAP's uniform variant.

`prefix` keeps the first ⌈κ·n⌉ units: a run trained with `--twist.sampling nested` sorted its units
by weight norm at the start and trained exactly that subnet at each of its groups' κ. `ranked` is the
same for `--twist.sampling rewired`: the ⌈κ·n⌉ most important units by the ranking its groups shared
(`twist_scale.importance`, from the statistics kept in training).

Two zero-cost methods choose adaptive widths from the central model alone, under the same budget:
`adaptive_magnitude` ranks standardised weight norms; `adaptive_stats` is FLAP AL-AM's ranking with
the activation statistics that training under correction 'mean' kept (running E[x] and E[x²]), so
no calibration pass, and the dropped units' means are folded as in training.

`random_best` keeps TwIST's draws but looks before it exports: of `BEST_OF` seeded draws, the one
whose folded subnet has the lowest loss on a few calibration windows (forward passes only). Draws
differ by ±6-33% in perplexity and the best one differs from run to run, so the pick looks at the run
(bench/quality_spread.py).

Calibrated methods say in the registry what they read from the calibration batches
(`calibration.py`); the exporter computes it once per pruner. `taylor` reads loss gradients.
`wanda_sp` reads the batches themselves: FLAP's Wanda-sp measures each layer on the model whose
earlier layers are already pruned, and which units those lose depends on κ.
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


@dataclass(frozen=True)
class PruneMethod:
    select: Callable[[PruneInputs], SubnetSpec]
    doc: str
    needs_stats: bool = False  # ActivationStats of the full model on calibration text
    needs_grads: bool = False  # loss gradients of the full model on calibration text
    needs_batches: bool = False  # the calibration batches, for passes that depend on κ
    needs_training_stats: bool = False  # ActivationStats kept while training (correction 'mean'), not calibration
    needs_subnet_loss: bool = False  # the calibration loss of a candidate subnet, built as it would be exported
    seeded: bool = False  # different seeds give different subnets (evaluation draws several)
    correction: str | None = None  # folded at export instead of the model's own; None = the trained one
    calibration: tuple[int, int] = (32, 256)  # default (windows, tokens each): the reference's own setting
    adaptive: bool = False  # widths differ per unit block (same total weight); else each keeps ⌈κ·n⌉ units

    @property
    def calibrated(self) -> bool:
        """Whether the method needs calibration text at all (export and evaluation then require it)."""
        return self.needs_stats or self.needs_grads or self.needs_batches or self.needs_subnet_loss


def check_kappa(kappa: float) -> None:
    if not 0.0 < kappa <= 1.0:
        raise ValueError(f"--kappa {kappa} must be in (0, 1] (the fraction of units kept; 0.5 = 50% sparsity)")


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


FLAP_CALIBRATION = (1024, 128)  # FLAP's published runs: --nsamples 1024, model.seqlen 128

METHODS: dict[str, PruneMethod] = {
    "random": PruneMethod(select_random, "seeded uniform draw (TwIST zero-cost export)", seeded=True),
    "random_best": PruneMethod(
        select_best_draw,
        f"the best of {BEST_OF} seeded draws by loss on a few calibration windows (forward passes only)",
        needs_subnet_loss=True,
        seeded=True,
        calibration=(8, 256),  # ~2k tokens: the best or second-best draw in 25 of 26 measured cells
    ),
    "prefix": PruneMethod(select_prefix, "the first units: what a group at κ trained under nested sampling"),
    "magnitude": PruneMethod(select_magnitude, "unit weight norm, no data"),
    "ranked": PruneMethod(
        select_ranked,
        "the most important units by the running Var(X)·‖W‖² kept in training (correction 'mean'), ⌈κ·n⌉ per layer: "
        "what every group trained under rewired sampling",
        needs_training_stats=True,
    ),
    "wanda_sp": PruneMethod(
        select_wanda_sp,
        "|W|·‖X‖ on calibration text, layer by layer on the pruned prefix",
        needs_batches=True,
        calibration=(128, 128),  # FLAP's prune_wanda_sp: 128 C4 rows of 128 tokens (more rows are zeros)
    ),
    "taylor": PruneMethod(
        select_taylor,
        "LLM-Pruner block-wise Taylor: Σ|w·∂L/∂w| per unit",
        needs_grads=True,
        calibration=(10, 64),  # LLM-Pruner's hf_prune.py: --num_examples 10, seq_len 64
    ),
    "flap": PruneMethod(
        select_flap,
        "FLAP AL-AM: standardised Var(X)·‖W‖², one global ranking (adaptive widths), bias-compensated",
        needs_stats=True,
        correction="mean",
        adaptive=True,
        calibration=FLAP_CALIBRATION,
    ),
    "adaptive_magnitude": PruneMethod(
        select_adaptive_magnitude,
        "standardised unit weight norm, one global ranking (adaptive widths), no data",
        adaptive=True,
    ),
    "adaptive_stats": PruneMethod(
        select_flap,
        "FLAP AL-AM's ranking from the running Var(X) kept in training (correction 'mean'): no calibration",
        needs_training_stats=True,
        adaptive=True,
    ),
    "flap_uniform": PruneMethod(
        select_flap_uniform,
        "FLAP UL-UM: Var(X)·‖W‖², ⌈κ·n⌉ per layer, bias-compensated",
        needs_stats=True,
        correction="mean",
        calibration=FLAP_CALIBRATION,
    ),
}


def method(name: str) -> PruneMethod:
    if name not in METHODS:
        raise ValueError(f"unknown pruning method {name!r}; choose one of {', '.join(METHODS)} (--method)")
    return METHODS[name]
