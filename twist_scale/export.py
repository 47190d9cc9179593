"""Zero-cost pruning: any κ-subnet of a central model as a smaller dense Hugging Face checkpoint.

Train once, deploy many: the same central model exports every κ. The activation-shift correction
the model was trained with is folded into the weights, so the export needs no hooks at inference:
- 'scale': the output projection's kept input channels are multiplied by 1/κ_layer (its weight);
- 'mean': W[:, dropped] · E[a_dropped] is added to the output projection's bias. Llama has no
  biases, so the export turns on `attention_bias` and `mlp_bias` with zero q/k/v/gate/up biases
  (and zero o/down biases in layers that lose nothing).

Uniform widths load with plain `AutoModelForCausalLM.from_pretrained`. Widths a Hugging Face
config cannot express (shared layers kept whole; any pruned GPT-2 attention, whose head size is
tied to n_embd / n_head) keep the full-width config.json — plain loading then fails on a size
mismatch — and load through `load_exported`, which reads the per-layer widths from
twist_subnet.json. `load_exported` also loads the uniform kind, so it is the one call to use.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerBase
from transformers.initialization import no_init_weights

from twist_scale.atomic import atomic_directory
from twist_scale.central_io import load_central
from twist_scale.correction import ACT_MEAN, ACT_SQ_MEAN, correction_of
from twist_scale.data import token_stream
from twist_scale.logs import setup_logging
from twist_scale.models import UnitGroup, Widths, architecture_of
from twist_scale.prune import (
    METHODS,
    ActivationStats,
    PruneInputs,
    PruneMethod,
    calibration_batches,
    check_kappa,
    collect_activation_stats,
    collect_gradients,
    method,
)
from twist_scale.subnet import SubnetSpec, apply_subnet_shapes, default_shared_layers, partitioned_groups

log = logging.getLogger(__name__)

SUBNET_FILE = "twist_subnet.json"
PLAIN_LOADER = "transformers.AutoModelForCausalLM.from_pretrained"
TWIST_LOADER = "twist_scale.export.load_exported"


# ---------------------------------------------------------------- building, saving, loading
def layer_widths(unit_groups: list[UnitGroup], spec: SubnetSpec) -> Widths:
    widths: Widths = {}
    for ug in unit_groups:
        widths.setdefault(ug.layer, {})[ug.kind] = len(spec.units(ug))
    return widths


@torch.no_grad()
def build_subnet(
    model: nn.Module, spec: SubnetSpec, correction: str = "none", means: dict[str, torch.Tensor] | None = None
) -> tuple[nn.Module, bool]:
    """The spec's subnet as a new dense model with the correction folded; `model` is left untouched.

    `means` maps output-module names to unit activation means (correction 'mean'). Returns the
    model and whether its config states its widths (True: plain from_pretrained can load it).
    """
    fold = correction_of(correction)
    sub = copy.deepcopy(model).eval()
    arch = architecture_of(sub)
    groups = arch.unit_groups(sub.config)
    pruned = [ug for ug in groups if len(spec.units(ug)) < ug.num_units]
    if fold.folds_bias and pruned:
        arch.enable_bias(sub)
        groups = arch.unit_groups(sub.config)  # the unit map now owns the new q/k/v/gate/up biases too
        pruned = [ug for ug in groups if len(spec.units(ug)) < ug.num_units]
    for ug in pruned:  # from full-width weights, before slicing
        fold.fold(sub.get_submodule(ug.output_module), ug, spec.units(ug), means or {})
    apply_subnet_shapes(sub, groups, spec)
    config = arch.shrunk_config(sub.config, layer_widths(groups, spec))
    if config is not None:
        sub.config = config
    return sub, config is not None


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


README = """# TwIST subnet export

The κ={kappa:g} subnet of `{source}` as a dense model: {parameters:,} parameters, pruning method
`{method}` (seed {seed}), activation-shift correction `{correction}` folded into the weights.

Load it with:

```python
{load}
```

{why}

`twist_subnet.json` records the per-layer widths and which units of the central model were kept.
"""


def save_exported(
    directory: Path, model: nn.Module, tokenizer: PreTrainedTokenizerBase, plain: bool, record: dict
) -> Path:
    """Checkpoint + tokenizer + twist_subnet.json + README.md, written aside and renamed (never half a model)."""
    directory = Path(directory)
    loader = PLAIN_LOADER if plain else TWIST_LOADER
    if not plain:  # makes the full-width config.json say why plain loading reports size mismatches
        model.config.twist_subnet = f"per-layer widths in {SUBNET_FILE}: load with {TWIST_LOADER}(dir)"
    record = {"loader": loader, "parameters": parameter_count(model), **record}
    load = (
        f'from transformers import AutoModelForCausalLM\nmodel = AutoModelForCausalLM.from_pretrained("{directory}")'
        if plain
        else f'from twist_scale.export import load_exported\nmodel = load_exported("{directory}")'
    )
    why = (
        "Every layer has the same width, so config.json states it and any Hugging Face tool loads it."
        if plain
        else "Layers have different widths (or a width the architecture's config cannot state), so config.json "
        "keeps the full-width shape and `AutoModelForCausalLM.from_pretrained` fails with size mismatches."
    )
    fields = {"source": "?", "method": "?", "seed": 0, "correction": "none"} | record
    with atomic_directory(directory) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / SUBNET_FILE).write_text(json.dumps(record, indent=2))
        (tmp / "README.md").write_text(README.format(load=load, why=why, **fields))
    return directory


def load_exported(directory: str | Path) -> nn.Module:
    """The one loader for every export: plain from_pretrained when the config states the widths,
    else build the full-width skeleton, shrink it to the recorded widths and load the weights."""
    directory = Path(directory)
    record_file = directory / SUBNET_FILE
    if not record_file.is_file():
        raise FileNotFoundError(
            f"{directory} is not a TwIST export (no {SUBNET_FILE}); export one with launch/export.py, "
            "or load a central model with twist_scale.central_io.load_central"
        )
    record = json.loads(record_file.read_text())
    if record["loader"] == PLAIN_LOADER:
        return AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    config = AutoConfig.from_pretrained(directory)
    with no_init_weights():  # every value is overwritten below; untouched memory never becomes resident
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.tie_weights()  # init_weights, skipped above, is also what ties the LM head to the embeddings
    widths = {int(layer): w for layer, w in record["widths"].items()}
    groups = architecture_of(model).unit_groups(config)
    apply_subnet_shapes(model, groups, SubnetSpec({ug.key: tuple(range(widths[ug.layer][ug.kind])) for ug in groups}))
    state: dict[str, torch.Tensor] = {}
    for file in sorted(directory.glob("*.safetensors")):
        state |= load_file(str(file))
    missing, unexpected = model.load_state_dict(state, strict=False)
    params = dict(model.named_parameters(remove_duplicate=False))
    loaded = {id(params[n]) for n in state if n in params}
    untied = [n for n in missing if n in params and id(params[n]) not in loaded]  # tied embeddings are fine
    if untied or unexpected:
        raise RuntimeError(
            f"{directory}: checkpoint does not match its {SUBNET_FILE}: missing {untied}, unexpected {unexpected}"
        )
    return model.eval()


# ---------------------------------------------------------------- from a central model directory
@dataclass
class Central:
    """A trained central model and what pruning needs from its run (correction, means, shared layers)."""

    directory: Path
    model: nn.Module
    tokenizer: PreTrainedTokenizerBase
    means: dict[str, torch.Tensor]  # output module -> unit activation means (correction 'mean')
    meta: dict
    training_stats: ActivationStats | None = None  # running E[x], E[x²] kept in training ('mean')

    @classmethod
    def load(cls, directory: str | Path) -> Central:
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
            raise ValueError(f"--shared-layers {choice}: the model has layers 0..{n - 1}")
        return layers

    def calibration_text_files(self) -> list[str]:
        """The run's training files (from <run>/config.json): calibration data when none is given."""
        config = self.directory.parent / "config.json"
        return json.loads(config.read_text())["data"]["train_files"] if config.is_file() else []


@dataclass
class Pruner:
    """A central model + one pruning method: the folded subnet for any κ and seed."""

    central: Central
    method: PruneMethod
    method_name: str
    unit_groups: list[UnitGroup]  # partitioned
    shared_layers: list[int]
    correction: str
    means: dict[str, torch.Tensor]
    stats: ActivationStats | None = None
    grads: dict[str, torch.Tensor] | None = None
    calibration: list[torch.Tensor] | None = None

    def spec(self, kappa: float, seed: int = 0) -> SubnetSpec:
        check_kappa(kappa)
        inputs = PruneInputs(
            self.central.model, self.unit_groups, kappa, seed, self.stats, self.grads, self.calibration
        )
        return self.method.select(inputs)

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
            "kept": {f"{layer}.{kind}": list(ids) for (layer, kind), ids in spec.kept.items()},
        }


def build_pruner(
    central: Central,
    method_name: str,
    shared_layers: str = "auto",
    correction: str = "auto",
    calibration: list[torch.Tensor] | None = None,
) -> Pruner:
    """Correction 'auto': the method's own (FLAP: 'mean' with calibration means), else the trained one."""
    chosen = method(method_name)
    shared = central.shared_layers(shared_layers)
    groups = partitioned_groups(architecture_of(central.model).unit_groups(central.model.config), shared)
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
    batches = calibration if chosen.needs_batches else None
    return Pruner(central, chosen, method_name, groups, shared, fix, means, stats, grads, batches)


def export_name(method_name: str, kappa: float, seed: int, seeded: bool) -> str:
    return f"{method_name}_kappa_{kappa:.2f}" + (f"_seed{seed}" if seeded else "")


def export_subnet(pruner: Pruner, out_dir: Path, kappa: float, seed: int = 0) -> Path:
    model, plain, spec = pruner.subnet(kappa, seed)
    groups = architecture_of(pruner.central.model).unit_groups(pruner.central.model.config)
    record = pruner.record(kappa, seed, spec, layer_widths(groups, spec))
    directory = out_dir / export_name(pruner.method_name, kappa, seed, pruner.method.seeded)
    return save_exported(directory, model, pruner.central.tokenizer, plain, record)


def calibration_from_files(
    files: list[str], tokenizer: PreTrainedTokenizerBase, samples: int, seqlen: int, seed: int = 0
) -> list[torch.Tensor]:
    for f in files:
        if not Path(f).is_file():
            raise FileNotFoundError(f"calibration file {f} does not exist; fix --calibration")
    return calibration_batches(token_stream(files, tokenizer), samples, seqlen, batch_size=8, seed=seed)


def add_pruning_args(parser: argparse.ArgumentParser) -> None:
    """Flags shared by export and evaluate: which subnet, which correction, which calibration text."""
    parser.add_argument("central", type=Path, help="central model directory (a run's final/)")
    parser.add_argument("--method", default="random", help=f"pruning method: {', '.join(METHODS)}")
    parser.add_argument("--shared-layers", default="auto", help="'auto' (as trained), 'none', or e.g. '0,1,4,5'")
    parser.add_argument("--correction", default="auto", help="'auto', 'none', 'scale' or 'mean'")
    parser.add_argument("--calibration", nargs="*", default=None, help="calibration text (default: training files)")
    parser.add_argument("--calibration-samples", type=int, default=32, help="calibration windows (of --window)")
    parser.add_argument("--window", type=int, default=256, help="tokens per window")


def pruner_from_args(args: argparse.Namespace) -> Pruner:
    central = Central.load(args.central)
    calibration = None
    if method(args.method).calibrated:
        files = args.calibration or central.calibration_text_files()
        calibration = calibration_from_files(files, central.tokenizer, args.calibration_samples, args.window)
    return build_pruner(central, args.method, args.shared_layers, args.correction, calibration)


def main(argv: list[str] | None = None) -> None:
    """`twist-export RUN/final --kappa 0.75 0.5 0.25 --out exports/`: one dense checkpoint per κ (and seed)."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    add_pruning_args(parser)
    parser.add_argument("--kappa", type=float, nargs="+", required=True, help="keep ratios in (0, 1]")
    parser.add_argument("--seed", type=int, nargs="+", default=[0], help="draws of a seeded method (random)")
    parser.add_argument("--out", type=Path, required=True, help="parent directory of the exports")
    args = parser.parse_args(argv)
    setup_logging()
    try:
        for kappa in args.kappa:
            check_kappa(kappa)
        pruner = pruner_from_args(args)
    except (ValueError, FileNotFoundError) as err:
        parser.exit(2, f"error: {err}\n")
    for kappa in args.kappa:
        for seed in args.seed if pruner.method.seeded else [0]:
            path = export_subnet(pruner, args.out, kappa, seed)
            log.info("kappa %.2f seed %d -> %s", kappa, seed, path)
            print(path)
