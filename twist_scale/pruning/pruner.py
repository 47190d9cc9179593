"""From a trained central model to exports: the model and its run (`SavedCentral`), a method over it (`Pruner`).

`build_pruner` computes once what the method reads (calibration statistics, gradients, batches or
the statistics training kept) and which correction is folded; `export_subnet` writes one κ (and seed).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from twist_scale.central_io import load_central
from twist_scale.correction import ACT_MEAN, ACT_SQ_MEAN, correction_of
from twist_scale.models import UnitBlock, Widths, architecture_of
from twist_scale.pruning.build import build_subnet, layer_widths
from twist_scale.pruning.calibration import (
    ActivationStats,
    collect_activation_stats,
    collect_gradients,
    mean_token_nll,
)
from twist_scale.pruning.format import save_exported
from twist_scale.pruning.methods import PruneMethod, check_kappa, method
from twist_scale.pruning.selectors import PruneInputs
from twist_scale.subnet import SubnetSpec, default_shared_layers, partitioned_blocks


@dataclass
class SavedCentral:
    """A trained central model and what pruning needs from its run (correction, means, shared layers)."""

    directory: Path
    model: nn.Module
    tokenizer: PreTrainedTokenizerBase
    means: dict[str, torch.Tensor]  # output module -> unit activation means (correction 'mean')
    meta: dict
    training_stats: ActivationStats | None = None  # running E[x], E[x²] kept in training ('mean')

    @classmethod
    def load(cls, directory: str | Path) -> SavedCentral:
        directory = Path(directory)
        if not (directory / "config.json").is_file():
            raise FileNotFoundError(
                f"no model in {directory} (no config.json): pass a central model directory, e.g. "
                "runs/twist_brown/final written at the end of training"
            )
        model, tokenizer, stats, meta = load_central(directory)
        by_stat = {
            stat: {n.removesuffix(f".{stat}"): t for n, t in stats.items() if n.endswith(f".{stat}")}
            for stat in (ACT_MEAN, ACT_SQ_MEAN)
        }
        means, squares = by_stat[ACT_MEAN], by_stat[ACT_SQ_MEAN]
        training = ActivationStats(means, squares, tokens=0) if squares and squares.keys() == means.keys() else None
        return cls(directory, model.eval(), tokenizer, means, meta, training)

    @property
    def correction(self) -> str:
        return self.meta.get("correction", "none")

    def shared_layers(self, choice: str = "auto") -> list[int]:
        """'auto': the layers training kept whole; 'none': prune every layer; or '0,1,5'."""
        n = architecture_of(self.model).num_layers(self.model.config)
        if choice == "auto":
            return list(self.meta.get("shared_layers", default_shared_layers(n)))
        layers = [] if choice == "none" else [int(x) for x in choice.split(",") if x.strip()]
        if any(not 0 <= i < n for i in layers):
            raise ValueError(f"--shared_layers {choice}: the model has layers 0..{n - 1}")
        return layers

    def calibration_text_files(self) -> list[str]:
        """The run's training files (from <run>/config.json): calibration data when none is given."""
        config = self.directory.parent / "config.json"
        return json.loads(config.read_text())["data"]["train_files"] if config.is_file() else []


@dataclass
class Pruner:
    """A central model + one pruning method: the folded subnet for any κ and seed."""

    central: SavedCentral
    method: PruneMethod
    method_name: str
    unit_blocks: list[UnitBlock]  # partitioned
    shared_layers: list[int]
    correction: str
    means: dict[str, torch.Tensor]
    stats: ActivationStats | None = None
    grads: dict[str, torch.Tensor] | None = None
    calibration: list[torch.Tensor] | None = None

    def spec(self, kappa: float, seed: int = 0) -> SubnetSpec:
        check_kappa(kappa)
        loss = self._subnet_loss if self.method.needs_subnet_loss else None
        inputs = PruneInputs(
            self.central.model, self.unit_blocks, kappa, seed, self.stats, self.grads, self.calibration, loss
        )
        return self.method.select(inputs)

    def _subnet_loss(self, spec: SubnetSpec) -> float:
        """The spec's calibration loss as the export would score it: sliced, with this pruner's correction."""
        model, _ = build_subnet(self.central.model, spec, self.correction, self.means)
        return mean_token_nll(model, self.calibration or [])

    def subnet(self, kappa: float, seed: int = 0) -> tuple[nn.Module, bool, SubnetSpec]:
        spec = self.spec(kappa, seed)
        model, plain = build_subnet(self.central.model, spec, self.correction, self.means)
        return model, plain, spec

    def record(self, kappa: float, seed: int, spec: SubnetSpec, widths: Widths) -> dict:
        return {
            "kappa": kappa,
            "method": self.method_name,
            "seed": seed,
            "correction": self.correction,
            "shared_layers": self.shared_layers,
            "source": str(self.central.directory.resolve()),
            "widths": {str(k): v for k, v in widths.items()},
            "kept": {f"{layer}.{kind}": list(ids) for (layer, kind), ids in spec.ids().items()},
        }


def build_pruner(
    central: SavedCentral,
    method_name: str,
    shared_layers: str = "auto",
    correction: str = "auto",
    calibration: list[torch.Tensor] | None = None,
) -> Pruner:
    """Correction 'auto': the method's own (FLAP: 'mean' with calibration means), else the trained one."""
    chosen = method(method_name)
    shared = central.shared_layers(shared_layers)
    groups = partitioned_blocks(architecture_of(central.model).unit_blocks(central.model.config), shared)
    if chosen.calibrated and not calibration:
        raise ValueError(f"method {method_name!r} needs calibration text: pass --calibration FILE")
    stats = collect_activation_stats(central.model, groups, calibration) if chosen.needs_stats else None
    if chosen.needs_training_stats:
        if central.training_stats is None:
            raise ValueError(
                f"method {method_name!r} ranks units by the activation statistics kept in training: it needs a "
                "central model trained with --twist.correction mean (use adaptive_magnitude for any other)"
            )
        stats = central.training_stats
    grads = collect_gradients(central.model, groups, calibration) if chosen.needs_grads else None
    own = chosen.correction is not None
    fix = correction if correction != "auto" else (chosen.correction if own else central.correction)
    correction_of(fix)
    means = stats.mean if own and stats is not None else central.means
    batches = calibration if chosen.needs_batches or chosen.needs_subnet_loss else None
    return Pruner(central, chosen, method_name, groups, shared, fix, means, stats, grads, batches)


def export_name(method_name: str, kappa: float, seed: int, seeded: bool) -> str:
    return f"{method_name}_kappa_{kappa:.2f}" + (f"_seed{seed}" if seeded else "")


def export_subnet(pruner: Pruner, out_dir: Path, kappa: float, seed: int = 0) -> Path:
    model, plain, spec = pruner.subnet(kappa, seed)
    groups = architecture_of(pruner.central.model).unit_blocks(pruner.central.model.config)
    record = pruner.record(kappa, seed, spec, layer_widths(groups, spec))
    directory = out_dir / export_name(pruner.method_name, kappa, seed, pruner.method.seeded)
    return save_exported(directory, model, pruner.central.tokenizer, plain, record)
