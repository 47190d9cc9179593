"""Which units a κ-subnet keeps: a registry of pruning methods with one signature (wanda's discipline).

Every method maps a `PruneInputs` to a `SubnetSpec` over the partitioned unit groups, so TwIST's
zero-cost export (`random`) and the post-hoc baselines (`magnitude`, `wanda_sp`, `flap`) go
through the same exporter and the same perplexity protocol. Selection is per layer with the same
keep count ⌈κ·n⌉ everywhere (FLAP's uniform variant), so every method yields the same widths and
the exports are directly comparable.

Activation-aware methods read `ActivationStats`, gathered on a small calibration set at the input
of each output projection (o_proj / down_proj / c_proj) — the same place where TwIST's 'mean'
correction keeps its running means. FLAP's bias compensation is therefore exactly the 'mean'
fold with calibration means, and the registry says so (`PruneMethod.correction`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import nn

from twist_scale.models import UnitGroup, units_to_keep
from twist_scale.subnet import SubnetSampler, SubnetSpec


@dataclass(frozen=True)
class ActivationStats:
    """Per input channel of each output projection (keyed by module name): E[x] and E[x²] over tokens."""

    mean: dict[str, torch.Tensor]
    sq_mean: dict[str, torch.Tensor]
    tokens: int

    def variance(self, module: str) -> torch.Tensor:
        return (self.sq_mean[module] - self.mean[module] ** 2).clamp_min(0.0)


@dataclass(frozen=True)
class PruneInputs:
    """Everything a method may look at; a method that needs `stats` says so in the registry."""

    model: nn.Module  # full width, not modified
    unit_groups: list[UnitGroup]  # the partitioned groups: the ones a subnet shrinks
    kappa: float
    seed: int = 0
    stats: ActivationStats | None = None


@dataclass(frozen=True)
class PruneMethod:
    select: Callable[[PruneInputs], SubnetSpec]
    doc: str
    calibrated: bool = False  # needs ActivationStats from calibration text
    seeded: bool = False  # different seeds give different subnets (evaluation draws several)
    correction: str | None = None  # folded at export instead of the model's own; None = the trained one


def check_kappa(kappa: float) -> None:
    if not 0.0 < kappa <= 1.0:
        raise ValueError(f"--kappa {kappa} must be in (0, 1] (the fraction of units kept; 0.5 = 50% sparsity)")


def _top_units(inputs: PruneInputs, score: Callable[[UnitGroup], torch.Tensor]) -> SubnetSpec:
    """Keep the ⌈κ·n⌉ highest-scoring units of every partitioned group (ties: lower id first)."""
    kept = {}
    for ug in inputs.unit_groups:
        order = torch.sort(-score(ug).double(), stable=True).indices
        kept[ug.key] = tuple(sorted(order[: units_to_keep(ug.num_units, inputs.kappa)].tolist()))
    return SubnetSpec(kept)


def per_unit(values: torch.Tensor, ug: UnitGroup, tensor_name: str) -> torch.Tensor:
    """Sum a per-channel vector (one entry per index along a unit axis) into one value per unit."""
    axis = next(a for a in ug.axes if a.name == tensor_name)
    channels = values.index_select(0, axis.index(torch.arange(ug.num_units)))
    return channels.view(axis.segments, ug.num_units, axis.width).sum(dim=(0, 2))


def _output_weight_columns(model: nn.Module, ug: UnitGroup) -> torch.Tensor:
    """The output projection's weight as (out features, unit channels), whatever its layout."""
    w = model.get_submodule(ug.output_module).weight.detach().float()
    return w if ug.output_input_axis == 1 else w.T


def select_random(inputs: PruneInputs) -> SubnetSpec:
    """TwIST's zero-cost export: a seeded uniform draw, as in training (one group, round = seed)."""
    return SubnetSampler(tuple(inputs.unit_groups), 1, inputs.kappa, inputs.seed).specs(inputs.seed)[0]


def select_magnitude(inputs: PruneInputs) -> SubnetSpec:
    """Data-free: the squared L2 norm of all weights a unit owns (q/k/v rows and o columns, or one neuron)."""
    params = dict(inputs.model.named_parameters())

    def score(ug: UnitGroup) -> torch.Tensor:
        total = torch.zeros(ug.num_units, dtype=torch.float64)
        for axis in ug.axes:
            if axis.name not in params:
                continue
            w = params[axis.name].detach().double()
            other = [d for d in range(w.dim()) if d != axis.axis]
            channel_sq = (w**2).sum(dim=other) if other else w**2
            total += per_unit(channel_sq, ug, axis.name)
        return total

    return _top_units(inputs, score)


def _stats(inputs: PruneInputs) -> ActivationStats:
    if inputs.stats is None:
        raise ValueError("this pruning method needs calibration statistics (pass calibration text)")
    return inputs.stats


def select_wanda_sp(inputs: PruneInputs) -> SubnetSpec:
    """Wanda-sp (structured Wanda, as in the FLAP paper): Σ_i |W_ij| · ‖X_j‖ over a unit's channels j."""
    stats = _stats(inputs)

    def score(ug: UnitGroup) -> torch.Tensor:
        w = _output_weight_columns(inputs.model, ug)
        channel = w.abs().sum(0).double() * stats.sq_mean[ug.output_module].double().sqrt()
        return per_unit(channel, ug, f"{ug.output_module}.weight")

    return _top_units(inputs, score)


def select_flap(inputs: PruneInputs) -> SubnetSpec:
    """FLAP's fluctuation metric: Var(X_j) · ‖W_:,j‖² — how much a channel's removal moves the output
    once its mean is compensated by a bias (done at export, see PruneMethod.correction)."""
    stats = _stats(inputs)

    def score(ug: UnitGroup) -> torch.Tensor:
        w = _output_weight_columns(inputs.model, ug)
        channel = (w**2).sum(0).double() * stats.variance(ug.output_module).double()
        return per_unit(channel, ug, f"{ug.output_module}.weight")

    return _top_units(inputs, score)


METHODS: dict[str, PruneMethod] = {
    "random": PruneMethod(select_random, "seeded uniform draw (TwIST zero-cost export)", seeded=True),
    "magnitude": PruneMethod(select_magnitude, "unit weight norm, no data"),
    "wanda_sp": PruneMethod(select_wanda_sp, "|W|·‖X‖ on calibration text", calibrated=True),
    "flap": PruneMethod(
        select_flap, "Var(X)·‖W‖² on calibration text, bias-compensated", calibrated=True, correction="mean"
    ),
}


def method(name: str) -> PruneMethod:
    if name not in METHODS:
        raise ValueError(f"unknown pruning method {name!r}; choose one of {', '.join(METHODS)} (--method)")
    return METHODS[name]


@torch.no_grad()
def collect_activation_stats(
    model: nn.Module, unit_groups: list[UnitGroup], batches: Iterable[torch.Tensor]
) -> ActivationStats:
    """E[x], E[x²] of every output projection's input over all calibration tokens (float64 sums)."""
    sums: dict[str, torch.Tensor] = {}
    squares: dict[str, torch.Tensor] = {}

    def hook(name: str) -> Callable:
        def pre_hook(module: nn.Module, args: tuple) -> None:
            x = args[0].detach().double().reshape(-1, args[0].shape[-1])  # (tokens, unit channels)
            sums[name] = sums.get(name, 0) + x.sum(0)
            squares[name] = squares.get(name, 0) + (x**2).sum(0)

        return pre_hook

    modules = sorted({ug.output_module for ug in unit_groups})
    handles = [model.get_submodule(m).register_forward_pre_hook(hook(m)) for m in modules]
    was_training = model.training
    model.eval()
    n = 0
    try:
        for batch in batches:
            model(input_ids=batch)
            n += batch.numel()
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    if n == 0:
        raise ValueError("no calibration tokens: the calibration text is empty or shorter than one window")
    return ActivationStats(
        {m: (sums[m] / n).float() for m in modules}, {m: (squares[m] / n).float() for m in modules}, n
    )


def calibration_batches(
    stream: torch.Tensor, samples: int, seqlen: int, batch_size: int, seed: int = 0
) -> list[torch.Tensor]:
    """`samples` random windows of `seqlen` tokens from a 1-D id stream (wanda: 128 × 2048 from C4)."""
    if stream.numel() <= seqlen:
        raise ValueError(f"calibration text has {stream.numel()} tokens, fewer than one window of {seqlen}")
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, stream.numel() - seqlen, (samples,), generator=g)
    windows = torch.stack([stream[s : s + seqlen] for s in starts.tolist()])
    return list(windows.split(batch_size))
