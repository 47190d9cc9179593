"""The distill protocol's settings: κ, the pipeline's post-hoc baselines and recovery share, and TwIST's recipes.

Kept out of bench/quality_distill.py, whose docstring describes them, so that its report
(bench/quality_distill_report.py) reads the same settings without importing the protocol.
"""

from __future__ import annotations

import dataclasses

from quality_ablation_recipes import Recipe

KAPPA = 0.5
BASELINES = ("flap", "random", "magnitude", "wanda_sp")  # post hoc on the dense run; FLAP is the one recovered
RECOVERY_SHARE = 0.5  # recovery tokens / dense fine-tuning tokens
ZERO_COST = ("random", "magnitude", "adaptive_magnitude", "adaptive_stats")


def recipe(name: str, **changes: object) -> Recipe:
    """A TwIST recipe of this protocol: G = 2, correction mean, every layer partitioned, H of the budget."""
    base = Recipe(name, "twist_brown.toml", 2, KAPPA, 2, "mean", name, export=ZERO_COST, kappas=(KAPPA,))
    return dataclasses.replace(base, **changes)


RECIPES = (
    recipe("independent"),
    recipe("independent_distill", distill="central"),
    recipe("independent_stored", distill="stored"),
    recipe("rewired_distill", kappa=0.75, sampling="rewired", distill="central", export=("ranked", "adaptive_stats")),
    recipe(
        "sandwich_distill",
        group_kappas=(1.0, KAPPA),
        sampling="nested",
        distill="central",
        export=("prefix", "adaptive_magnitude", "adaptive_stats"),
    ),
)
EQUAL_TOKENS = recipe("independent_tokens")
