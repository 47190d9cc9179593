"""The ablation's recipes: the fine-tuning protocol's TwIST run and the runs that each change one factor of it.

Kept out of bench/quality_ablation.py, whose docstring describes them, so that module holds only the protocol
and its report; every recipe trains the same optimizer steps on the fine-tuning protocol's tokens.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from quality_common import PICKED_METHODS, TWIST_METHODS, Budget, Run
from quality_tuning import DENSE, tune_overrides

KAPPA = 0.5
MIXED = (0.75, KAPPA)  # the mixed-κ recipe's groups; its larger size is also evaluated
CORRECTIONS = ("none", "scale", "mean")
OPTIMIZER_STATES = ("reset", "aggregate")
ISSUE_H = (5, 15, 50)  # asked at the reference's H = 15; scaled to the budget's H (quick: 5)
ISSUE_H_REFERENCE = 15
DENSE_METHODS = ("random", "magnitude", "flap")


@dataclass(frozen=True)
class Recipe(Run):
    """A run of the ablation: quality_common.Run plus the factors it varies and what it changed."""

    changed: str = "reference"
    local_steps: int = 15
    optimizer_state: str = "aggregate"
    shared_layers: str = "none"  # in training: 'none' (every layer partitioned) or 'auto' (the paper's)
    export: tuple[str, ...] = ()  # the methods evaluated; () the Run's own
    group_kappas: tuple[float, ...] = ()  # one κ per group (sandwich, mixed κ); () every group at `kappa`
    kappas: tuple[float, ...] = (KAPPA,)  # the κ its exports are evaluated at
    sampling: str = "independent"  # --twist.sampling: fresh draws, nested prefixes or rewired
    distill: str = "none"  # --twist.distill
    origin: str = "reference"  # the recipe this one changes one factor of

    @property
    def methods(self) -> tuple[str, ...]:
        return self.export or super().methods

    def budget(self, budget: Budget) -> Budget:
        """The budget's optimizer steps in rounds of this recipe's H."""
        steps = budget.rounds * budget.local_steps
        if steps % self.local_steps:
            raise ValueError(f"{self.name}: H={self.local_steps} does not divide the budget's {steps} steps")
        return dataclasses.replace(budget, local_steps=self.local_steps, rounds=steps // self.local_steps)

    def overrides(self, base: Path, seed: int) -> dict[str, object]:
        mixed = {"twist.group_kappas": ",".join(map(str, self.group_kappas))} if self.group_kappas else {}
        return {
            **tune_overrides(base, seed),
            "twist.optimizer_state": self.optimizer_state,
            "twist.shared_layers": self.shared_layers,
            "twist.sampling": self.sampling,
            "twist.distill": self.distill,
            **mixed,
        }


def dense(local_steps: int) -> Recipe:
    """Dense fine-tuning in the fine-tuning protocol's rounds, pruned post hoc by DENSE_METHODS."""
    return Recipe(
        DENSE.name, "dense_brown.toml", 1, 1.0, 2, "none", "dense", local_steps, export=DENSE_METHODS, kappas=MIXED
    )


def reference(local_steps: int) -> Recipe:
    """The fine-tuning protocol's TwIST run (quality_finetune.TWIST), every factor stated."""
    return Recipe("reference", "twist_brown.toml", 2, KAPPA, 2, "scale", "reference", local_steps, kappas=MIXED)


def nearest_divisor(steps: int, wanted: float) -> int:
    """The H that divides `steps` nearest to `wanted` (the larger one on a tie: fewer rounds)."""
    return min((h for h in range(1, steps + 1) if steps % h == 0), key=lambda h: (abs(h - wanted), -h))


def variants(ref: Recipe, steps: int) -> list[Recipe]:
    """The reference and one recipe per changed factor, every one on `steps` optimizer steps."""
    change = dataclasses.replace
    out = [ref]
    out += [
        change(ref, name=f"correction_{c}", correction=c, changed=f"correction {c}")
        for c in CORRECTIONS
        if c != ref.correction
    ]
    out += [
        change(ref, name=f"optimizer_{s}", optimizer_state=s, changed=f"optimizer state {s}")
        for s in OPTIMIZER_STATES
        if s != ref.optimizer_state
    ]
    asked = dict.fromkeys(nearest_divisor(steps, h * ref.local_steps / ISSUE_H_REFERENCE) for h in ISSUE_H)
    out += [
        change(ref, name=f"h{h}", local_steps=h, changed=f"H={h} ({steps // h} rounds)")
        for h in asked
        if h != ref.local_steps
    ]
    out.append(change(ref, name="g4", groups=4, procs=4, changed="G=4 (4 processes)"))
    shared = "shared layers: the paper's (first 2 + last 2 whole in training)"
    out.append(change(ref, name="shared_auto", shared_layers="auto", changed=shared))
    sandwich = "sandwich: group 0 always full width, group 1 κ=0.5"
    out.append(change(ref, name="sandwich", group_kappas=(1.0, KAPPA), kappas=(KAPPA,), changed=sandwich))
    nested = "nested sandwich: group 1 always the first half (units sorted by weight norm)"
    prefix = (*TWIST_METHODS, *PICKED_METHODS, "prefix")
    out.append(change(out[-1], name="nested", origin="sandwich", sampling="nested", export=prefix, changed=nested))
    out += [
        change(out[-1], name=f"nested_{c}", origin="nested", correction=c, changed=f"nested, correction {c}")
        for c in CORRECTIONS
        if c != ref.correction
    ]
    out.append(change(ref, name="mixed", group_kappas=MIXED, changed="mixed κ: groups at 0.75 and 0.5"))
    return out
