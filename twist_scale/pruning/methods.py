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

from collections.abc import Callable
from dataclasses import dataclass

from twist_scale.pruning.selectors import (
    BEST_OF,
    PruneInputs,
    select_adaptive_magnitude,
    select_best_draw,
    select_flap,
    select_flap_uniform,
    select_magnitude,
    select_prefix,
    select_random,
    select_ranked,
    select_taylor,
    select_wanda_sp,
)
from twist_scale.subnet import SubnetSpec


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
