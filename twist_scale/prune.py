"""Which units a κ-subnet keeps: a registry of pruning methods with one signature (wanda's discipline).

Every method maps a `PruneInputs` to a `SubnetSpec` over the partitioned unit groups, so TwIST's
zero-cost export (`random`) and the post-hoc baselines (`magnitude`, `wanda_sp`, `taylor`, `flap`,
`flap_uniform`) go through the same exporter and the same perplexity protocol. Most methods keep
⌈κ·n⌉ units in every partitioned group, so their exports have the same widths. `flap` is FLAP's
own default (AL-AM): one global ranking over all layers and both kinds, so widths differ per layer,
at the same total weight count as the uniform methods; `flap_uniform` is FLAP's uniform variant.

Two zero-cost methods choose adaptive widths from the central model alone, under the same budget:
`adaptive_magnitude` ranks standardised weight norms; `adaptive_stats` is FLAP AL-AM's ranking with
the activation statistics that training under correction 'mean' kept (running E[x] and E[x²]), so
no calibration pass, and the dropped units' means are folded as in training.

Calibrated methods say in the registry what they read from the calibration batches; the exporter
computes it once per pruner. `ActivationStats` are gathered at the input of each output projection
(o_proj / down_proj / c_proj) — the same place where TwIST's 'mean' correction keeps its running
means, so FLAP's bias compensation is exactly the 'mean' fold with calibration means
(`PruneMethod.correction`). `taylor` reads loss gradients (`collect_gradients`). `wanda_sp` reads the
batches themselves: FLAP's Wanda-sp measures each layer on the model whose earlier layers are
already pruned, and which units those lose depends on κ.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.nn.functional as F
from torch import nn

from twist_scale.models import UnitGroup, units_to_keep
from twist_scale.subnet import SubnetSampler, SubnetSpec

T = TypeVar("T")


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
    """Everything a method may look at; what a method reads from calibration text, the registry says."""

    model: nn.Module  # full width, not modified
    unit_groups: list[UnitGroup]  # the partitioned groups: the ones a subnet shrinks
    kappa: float
    seed: int = 0
    stats: ActivationStats | None = None  # PruneMethod.needs_stats (or needs_training_stats)
    grads: dict[str, torch.Tensor] | None = None  # PruneMethod.needs_grads: full-width, by parameter name
    calibration: list[torch.Tensor] | None = None  # PruneMethod.needs_batches: the batches of token ids


@dataclass(frozen=True)
class PruneMethod:
    select: Callable[[PruneInputs], SubnetSpec]
    doc: str
    needs_stats: bool = False  # ActivationStats of the full model on calibration text
    needs_grads: bool = False  # loss gradients of the full model on calibration text
    needs_batches: bool = False  # the calibration batches, for passes that depend on κ
    needs_training_stats: bool = False  # ActivationStats kept while training (correction 'mean'), not calibration
    seeded: bool = False  # different seeds give different subnets (evaluation draws several)
    correction: str | None = None  # folded at export instead of the model's own; None = the trained one
    adaptive: bool = False  # widths differ per group (same total weight); else every group keeps ⌈κ·n⌉ units

    @property
    def calibrated(self) -> bool:
        """Whether the method needs calibration text at all (export and evaluation then require it)."""
        return self.needs_stats or self.needs_grads or self.needs_batches


def check_kappa(kappa: float) -> None:
    if not 0.0 < kappa <= 1.0:
        raise ValueError(f"--kappa {kappa} must be in (0, 1] (the fraction of units kept; 0.5 = 50% sparsity)")


def _top(scores: torch.Tensor, kappa: float) -> tuple[int, ...]:
    """The ⌈κ·n⌉ highest-scoring unit ids of one group, ascending (ties: lower id first)."""
    order = torch.sort(-scores.double(), stable=True).indices
    return tuple(sorted(order[: units_to_keep(scores.numel(), kappa)].tolist()))


def _top_units(inputs: PruneInputs, score: Callable[[UnitGroup], torch.Tensor]) -> SubnetSpec:
    """Keep the ⌈κ·n⌉ highest-scoring units of every partitioned group."""
    return SubnetSpec({ug.key: _top(score(ug), inputs.kappa) for ug in inputs.unit_groups})


def _unit_channels(values: torch.Tensor, ug: UnitGroup, tensor_name: str) -> torch.Tensor:
    """A per-channel vector (one entry per index along a unit axis) as (segments, units, width)."""
    axis = next(a for a in ug.axes if a.name == tensor_name)
    channels = values.index_select(0, axis.index(torch.arange(ug.num_units)))
    return channels.view(axis.segments, ug.num_units, axis.width)


def per_unit(values: torch.Tensor, ug: UnitGroup, tensor_name: str) -> torch.Tensor:
    """Sum a per-channel vector (one entry per index along a unit axis) into one value per unit."""
    return _unit_channels(values, ug, tensor_name).sum(dim=(0, 2))


def _owned_sum(ug: UnitGroup, elementwise: Callable[[str], torch.Tensor | None]) -> torch.Tensor:
    """Σ of an element-wise score over every element a unit owns: its slice of each tensor in the unit
    map (q/k/v rows and o columns, or a neuron's gate/up rows and down column). `elementwise` gives
    the score of a whole tensor by name, or None for a tensor it does not score."""
    total = torch.zeros(ug.num_units, dtype=torch.float64)
    for axis in ug.axes:
        values = elementwise(axis.name)
        if values is None:
            continue
        other = [d for d in range(values.dim()) if d != axis.axis]
        total += per_unit(values.sum(dim=other) if other else values, ug, axis.name)
    return total


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

    def square(name: str) -> torch.Tensor | None:
        return params[name].detach().double() ** 2 if name in params else None

    return _top_units(inputs, lambda ug: _owned_sum(ug, square))


def _needs(value: T | None, what: str) -> T:
    """The input a method reads, or an error that says where it comes from."""
    if value is None:
        raise ValueError(f"this pruning method needs {what} (pass calibration text)")
    return value


def _stats(inputs: PruneInputs) -> ActivationStats:
    return _needs(inputs.stats, "calibration statistics")


@contextmanager
def _without_dropped(model: nn.Module, unit_groups: list[UnitGroup], spec: SubnetSpec) -> Iterator[None]:
    """Run the full-width model as if the spec's dropped units were removed, with no correction: their
    channels at the output projection's input are zeroed, which is what slicing them away gives."""
    handles = []
    for ug in unit_groups:
        module = model.get_submodule(ug.output_module)
        keep = module.weight.new_zeros(module.weight.shape[ug.output_input_axis])
        keep[ug.output_axis.index(spec.units(ug))] = 1.0
        handles.append(module.register_forward_pre_hook(lambda m, args, keep=keep: (args[0] * keep, *args[1:])))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def select_wanda_sp(inputs: PruneInputs) -> SubnetSpec:
    """Wanda-sp (structured Wanda, FLAP's `prune_wanda_sp`): Σ_j Σ_i |W_ij| · ‖X_j‖ over a unit's
    input channels j of the output projection, ⌈κ·n⌉ units per group.

    Layer by layer, as the reference: X is measured on the calibration batches with every earlier
    partitioned layer already pruned to its kept units (removed, not compensated), attention and MLP
    of one layer in the same pass. So a layer is scored on the inputs it sees once the earlier ones
    have lost their units; those depend on κ, so the passes run per call, one per partitioned layer.
    """
    batches = _needs(inputs.calibration, "calibration batches")
    kept: dict[tuple[int, str], tuple[int, ...]] = {}
    for layer in sorted({ug.layer for ug in inputs.unit_groups}):
        groups = [ug for ug in inputs.unit_groups if ug.layer == layer]
        done = [ug for ug in inputs.unit_groups if ug.key in kept]
        with _without_dropped(inputs.model, done, SubnetSpec(kept)):
            stats = collect_activation_stats(inputs.model, groups, batches)
        for ug in groups:
            w = _output_weight_columns(inputs.model, ug)
            channel = w.abs().sum(0).double() * stats.sq_mean[ug.output_module].double().sqrt()
            kept[ug.key] = _top(per_unit(channel, ug, f"{ug.output_module}.weight"), inputs.kappa)
    return SubnetSpec(kept)


def select_taylor(inputs: PruneInputs) -> SubnetSpec:
    """LLM-Pruner's block-wise Taylor importance ('param_first', group reduction 'sum'): Σ |w · ∂L/∂w|
    over every parameter a unit owns, ⌈κ·n⌉ units per group. |w · ∂L/∂w| is the first-order estimate
    of how much the loss changes when w is set to zero, so a unit scores what removing it costs."""
    grads = _needs(inputs.grads, "loss gradients on calibration text")
    params = dict(inputs.model.named_parameters())

    def saliency(name: str) -> torch.Tensor | None:
        return (params[name].detach().double() * grads[name].double()).abs() if name in grads else None

    return _top_units(inputs, lambda ug: _owned_sum(ug, saliency))


def _fluctuation(inputs: PruneInputs, ug: UnitGroup) -> torch.Tensor:
    """FLAP's WIFV per unit channel j of the output projection: Var(X_j) · ‖W_:,j‖² — how much the
    output moves when channel j is removed and its mean is compensated by a bias (export, 'mean')."""
    w = _output_weight_columns(inputs.model, ug)
    return (w**2).sum(0).double() * _stats(inputs).variance(ug.output_module).double()


def select_flap_uniform(inputs: PruneInputs) -> SubnetSpec:
    """FLAP's uniform variant (UL-UM): Σ_j WIFV_j over a unit's channels, ⌈κ·n⌉ units per group."""
    return _top_units(inputs, lambda ug: per_unit(_fluctuation(inputs, ug), ug, f"{ug.output_module}.weight"))


def _standardized(scores: torch.Tensor) -> torch.Tensor:
    """z-scores over all entries (unbiased std, as torch.std in FLAP's code); no spread: all zeros."""
    std = scores.std()
    return (scores - scores.mean()) / std if std > 0 else torch.zeros_like(scores)


def _standardized_unit_scores(inputs: PruneInputs, ug: UnitGroup) -> torch.Tensor:
    """FLAP AL-AM's comparable score: WIFV (squared for attention, as the reference does), standardised
    over the group's channels so layers and kinds share one scale, then averaged over each unit's
    channels (FLAP: per head). A group whose channels all score alike has no spread: all zeros."""
    channels = _unit_channels(_fluctuation(inputs, ug), ug, f"{ug.output_module}.weight")  # (segments, units, width)
    if ug.kind == "attn":
        channels = channels**2
    return _standardized(channels).mean(dim=(0, 2))


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


def _global_ranking(inputs: PruneInputs, score: Callable[[UnitGroup], torch.Tensor]) -> SubnetSpec:
    """One ranking of every partitioned unit, attention and MLP, across layers (FLAP's AL-AM).

    Units are ranked by their (standardised) score and the prefix of the ranking whose parameter
    count is nearest the budget B = Σ_groups ⌈κ·n⌉ · (unit weight) is kept — B is what a uniform
    method keeps, so widths adapt per layer and kind at the same size. Ties: group order, then lower
    id. Every group keeps at least one unit, as under `units_to_keep` (a GPT-2 block cannot run at
    zero width): if the ranking leaves a group empty, each group's best unit is kept first and the
    rest of the ranking fills the same budget.
    """
    groups = inputs.unit_groups
    sizes = [unit_weight(inputs.model, ug) for ug in groups]
    budget = float(sum(units_to_keep(ug.num_units, inputs.kappa) * w for ug, w in zip(groups, sizes, strict=True)))
    weight = torch.cat(
        [torch.full((ug.num_units,), w, dtype=torch.float64) for ug, w in zip(groups, sizes, strict=True)]
    )
    group_of = torch.cat([torch.full((ug.num_units,), g) for g, ug in enumerate(groups)])
    unit_id = torch.cat([torch.arange(ug.num_units) for ug in groups])
    scores = torch.cat([score(ug) for ug in groups])
    order = torch.sort(-scores, stable=True).indices
    kept = order[: _nearest_prefix(weight[order], budget, 1)]
    if group_of[kept].unique().numel() < len(groups):
        best = torch.tensor([int(order[group_of[order] == g][0]) for g in range(len(groups))])
        order = torch.cat([best, order[~torch.isin(order, best)]])
        kept = order[: _nearest_prefix(weight[order], budget, len(groups))]
    return SubnetSpec(
        {ug.key: tuple(sorted(unit_id[kept[group_of[kept] == g]].tolist())) for g, ug in enumerate(groups)}
    )


def select_flap(inputs: PruneInputs) -> SubnetSpec:
    """FLAP's default (AL-AM): the global ranking of standardised WIFV scores (`_global_ranking`)."""
    return _global_ranking(inputs, lambda ug: _standardized_unit_scores(inputs, ug))


def select_adaptive_magnitude(inputs: PruneInputs) -> SubnetSpec:
    """Zero-cost and data-free, with adaptive widths: each unit's owned squared weight norm (as
    `magnitude`), standardised within its group so layers and kinds share one scale, then the same
    global ranking under the same weight budget as FLAP AL-AM."""
    params = dict(inputs.model.named_parameters())

    def square(name: str) -> torch.Tensor | None:
        return params[name].detach().double() ** 2 if name in params else None

    return _global_ranking(inputs, lambda ug: _standardized(_owned_sum(ug, square)))


METHODS: dict[str, PruneMethod] = {
    "random": PruneMethod(select_random, "seeded uniform draw (TwIST zero-cost export)", seeded=True),
    "magnitude": PruneMethod(select_magnitude, "unit weight norm, no data"),
    "wanda_sp": PruneMethod(
        select_wanda_sp, "|W|·‖X‖ on calibration text, layer by layer on the pruned prefix", needs_batches=True
    ),
    "taylor": PruneMethod(select_taylor, "LLM-Pruner block-wise Taylor: Σ|w·∂L/∂w| per unit", needs_grads=True),
    "flap": PruneMethod(
        select_flap,
        "FLAP AL-AM: standardised Var(X)·‖W‖², one global ranking (adaptive widths), bias-compensated",
        needs_stats=True,
        correction="mean",
        adaptive=True,
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


def collect_gradients(
    model: nn.Module, unit_groups: list[UnitGroup], batches: Iterable[torch.Tensor]
) -> dict[str, torch.Tensor]:
    """∂L/∂w for every parameter the unit groups slice, L = the mean next-token loss over all
    calibration tokens — one backward of the mean loss over all examples, as LLM-Pruner takes it,
    accumulated batch by batch (each batch's summed loss) so memory stays one batch's.

    The model is left as it was: gradients come from `torch.autograd.grad`, so no `.grad` is written;
    `requires_grad` and train mode are restored; eval mode meanwhile, so dropout does not add noise.
    """
    names = {a.name for ug in unit_groups for a in ug.axes}
    params = {n: p for n, p in model.named_parameters() if n in names}
    flags = {n: p.requires_grad for n, p in params.items()}
    sums = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}
    was_training = model.training
    model.eval()
    tokens = 0
    try:
        for p in params.values():
            p.requires_grad_(True)
        for batch in batches:
            with torch.enable_grad():
                logits = model(input_ids=batch).logits[:, :-1].float()
                loss = F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten(), reduction="sum")
                grads = torch.autograd.grad(loss, list(params.values()))
            for name, g in zip(params, grads, strict=True):
                sums[name] += g.float()
            tokens += batch[:, 1:].numel()
    finally:
        for n, p in params.items():
            p.requires_grad_(flags[n])
        model.train(was_training)
    if tokens == 0:
        raise ValueError("no calibration tokens: the calibration text is empty or shorter than one window")
    return {n: (s / tokens).to(params[n].dtype) for n, s in sums.items()}


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
