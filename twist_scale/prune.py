"""Which units a κ-subnet keeps: a registry of pruning methods with one signature (wanda's discipline).

Every method maps a `PruneInputs` to a `SubnetSpec` over the partitioned unit groups, so TwIST's
zero-cost export (`random`) and the post-hoc baselines (`magnitude`, `wanda_sp`, `flap`,
`flap_uniform`) go through the same exporter and the same perplexity protocol. Most methods keep
⌈κ·n⌉ units in every partitioned group, so their exports have the same widths. `flap` is FLAP's
own default (AL-AM): one global ranking over all layers and both kinds, so widths differ per layer,
at the same total weight count as the uniform methods; `flap_uniform` is FLAP's uniform variant.

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
    adaptive: bool = False  # widths differ per group (same total weight); else every group keeps ⌈κ·n⌉ units


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


def _unit_channels(values: torch.Tensor, ug: UnitGroup, tensor_name: str) -> torch.Tensor:
    """A per-channel vector (one entry per index along a unit axis) as (segments, units, width)."""
    axis = next(a for a in ug.axes if a.name == tensor_name)
    channels = values.index_select(0, axis.index(torch.arange(ug.num_units)))
    return channels.view(axis.segments, ug.num_units, axis.width)


def per_unit(values: torch.Tensor, ug: UnitGroup, tensor_name: str) -> torch.Tensor:
    """Sum a per-channel vector (one entry per index along a unit axis) into one value per unit."""
    return _unit_channels(values, ug, tensor_name).sum(dim=(0, 2))


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


def _fluctuation(inputs: PruneInputs, ug: UnitGroup) -> torch.Tensor:
    """FLAP's WIFV per unit channel j of the output projection: Var(X_j) · ‖W_:,j‖² — how much the
    output moves when channel j is removed and its mean is compensated by a bias (export, 'mean')."""
    w = _output_weight_columns(inputs.model, ug)
    return (w**2).sum(0).double() * _stats(inputs).variance(ug.output_module).double()


def select_flap_uniform(inputs: PruneInputs) -> SubnetSpec:
    """FLAP's uniform variant (UL-UM): Σ_j WIFV_j over a unit's channels, ⌈κ·n⌉ units per group."""
    return _top_units(inputs, lambda ug: per_unit(_fluctuation(inputs, ug), ug, f"{ug.output_module}.weight"))


def _standardized_unit_scores(inputs: PruneInputs, ug: UnitGroup) -> torch.Tensor:
    """FLAP AL-AM's comparable score: WIFV (squared for attention, as the reference does), standardised
    over the group's channels so layers and kinds share one scale, then averaged over each unit's
    channels (FLAP: per head). A group whose channels all score alike has no spread: all zeros."""
    channels = _unit_channels(_fluctuation(inputs, ug), ug, f"{ug.output_module}.weight")  # (segments, units, width)
    if ug.kind == "attn":
        channels = channels**2
    std = channels.std()  # unbiased, as torch.std in the reference
    z = (channels - channels.mean()) / std if std > 0 else torch.zeros_like(channels)
    return z.mean(dim=(0, 2))


def unit_weight(model: nn.Module, ug: UnitGroup) -> int:
    """Parameters one unit of the group owns: its share of every sliced parameter tensor."""
    params = dict(model.named_parameters())
    return sum(
        params[a.name].numel() // params[a.name].shape[a.axis] * a.width * a.segments
        for a in ug.axes
        if a.name in params
    )


def _nearest_prefix(weights: torch.Tensor, budget: float, at_least: int) -> int:
    """How many leading entries to keep: the prefix (≥ at_least) whose total weight is nearest the budget."""
    gap = (weights.cumsum(0) - budget).abs()
    gap[: at_least - 1] = float("inf")
    return int(torch.argmin(gap)) + 1  # argmin: the first of equal gaps, the smaller model


def select_flap(inputs: PruneInputs) -> SubnetSpec:
    """FLAP's default (AL-AM): one ranking of every partitioned unit, attention and MLP, across layers.

    Units are ranked by their standardised score and the prefix of the ranking whose parameter count
    is nearest the budget B = Σ_groups ⌈κ·n⌉ · (unit weight) is kept — B is what a uniform method
    keeps, so widths adapt per layer and kind at the same size. Ties: group order, then lower id.
    Every group keeps at least one unit, as under `units_to_keep` (a GPT-2 block cannot run at zero
    width): if the ranking leaves a group empty, each group's best unit is kept first and the rest
    of the ranking fills the same budget.
    """
    groups = inputs.unit_groups
    sizes = [unit_weight(inputs.model, ug) for ug in groups]
    budget = float(sum(units_to_keep(ug.num_units, inputs.kappa) * w for ug, w in zip(groups, sizes, strict=True)))
    weight = torch.cat(
        [torch.full((ug.num_units,), w, dtype=torch.float64) for ug, w in zip(groups, sizes, strict=True)]
    )
    group_of = torch.cat([torch.full((ug.num_units,), g) for g, ug in enumerate(groups)])
    unit_id = torch.cat([torch.arange(ug.num_units) for ug in groups])
    scores = torch.cat([_standardized_unit_scores(inputs, ug) for ug in groups])
    order = torch.sort(-scores, stable=True).indices
    kept = order[: _nearest_prefix(weight[order], budget, 1)]
    if group_of[kept].unique().numel() < len(groups):
        best = torch.tensor([int(order[group_of[order] == g][0]) for g in range(len(groups))])
        order = torch.cat([best, order[~torch.isin(order, best)]])
        kept = order[: _nearest_prefix(weight[order], budget, len(groups))]
    return SubnetSpec(
        {ug.key: tuple(sorted(unit_id[kept[group_of[kept] == g]].tolist())) for g, ug in enumerate(groups)}
    )


METHODS: dict[str, PruneMethod] = {
    "random": PruneMethod(select_random, "seeded uniform draw (TwIST zero-cost export)", seeded=True),
    "magnitude": PruneMethod(select_magnitude, "unit weight norm, no data"),
    "wanda_sp": PruneMethod(select_wanda_sp, "|W|·‖X‖ on calibration text", calibrated=True),
    "flap": PruneMethod(
        select_flap,
        "FLAP AL-AM: standardised Var(X)·‖W‖², one global ranking (adaptive widths), bias-compensated",
        calibrated=True,
        correction="mean",
        adaptive=True,
    ),
    "flap_uniform": PruneMethod(
        select_flap_uniform,
        "FLAP UL-UM: Var(X)·‖W‖², ⌈κ·n⌉ per layer, bias-compensated",
        calibrated=True,
        correction="mean",
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
