"""One typed config tree for a run: dataclasses + TOML/YAML presets + dotted CLI overrides.

Precedence is CLI > file > defaults. Everything is validated before any process group, model
or dataset is built, so a typo costs a second, not a queued job.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomllib
import yaml

from twist_scale.atomic import atomic_write_text


class ConfigError(ValueError):
    """A config value that cannot run; the message names the field and what is allowed."""


def _doc(text: str, default: Any = dataclasses.MISSING, factory: Any = dataclasses.MISSING) -> Any:
    if factory is not dataclasses.MISSING:
        return field(default_factory=factory, metadata={"doc": text})
    return field(default=default, metadata={"doc": text})


@dataclass
class ModelConfig:
    arch: str = _doc("Architecture: 'llama' (MHA or GQA) or 'gpt2'.", "llama")
    size: str = _doc("Size preset from twist_scale.models.PRESETS (tiny, small, ...).", "tiny")
    pretrained: str = _doc("Local directory or hub id to load with from_pretrained; overrides size.", "")


@dataclass
class DataConfig:
    train_files: list[str] = _doc("Training text/jsonl/parquet files.", factory=list)
    valid_files: list[str] = _doc("Validation files for periodic perplexity.", factory=list)
    hub_dataset: str = _doc("A datasets hub name used instead of train_files when online.", "")
    text_field: str = _doc("Column that holds the text in jsonl/parquet files.", "text")
    tokenizer: str = _doc("Directory with tokenizer.model; trained there on train_files if absent.", "")
    vocab_size: int = _doc("Vocabulary size when training a new tokenizer.", 4096)
    block_size: int = _doc("Tokens per training sequence (packed, no padding).", 128)
    micro_batch_size: int = _doc("Sequences per rank per step.", 8)
    cache_dir: str = _doc("Tokenized-data cache; default <out_dir>/../.cache.", "")


@dataclass
class OptimConfig:
    name: str = _doc("'adamw' or 'sgd' (sgd makes TwIST's kappa=1 limit exactly data parallel).", "adamw")
    lr: float = _doc("Peak learning rate.", 3e-4)
    weight_decay: float = _doc("Decoupled weight decay.", 0.1)
    beta1: float = _doc("Adam beta1 (sgd: momentum).", 0.9)
    beta2: float = _doc("Adam beta2.", 0.95)
    eps: float = _doc("Adam epsilon.", 1e-8)
    grad_clip: float = _doc("Max global gradient norm; 0 disables clipping.", 1.0)
    warmup_steps: int = _doc("Linear warm-up steps before cosine decay.", 10)


@dataclass
class ParallelConfig:
    engine: str = _doc(
        "'deepspeed' (ZeRO), 'fsdp' (PyTorch FSDP2) or 'local' (plain torch, one process per group).",
        "deepspeed",
    )
    ds_config: str = _doc("DeepSpeed JSON in ds_configs/ with engine concerns only.", "ds_configs/zero1.json")
    backend: str = _doc(
        "'auto' (nccl on GPU, gloo on CPU), a torch backend ('gloo', 'nccl', or one registered with "
        "torch.distributed.Backend.register_backend), or torch's per-device form 'cpu:gloo,cuda:nccl'.",
        "auto",
    )
    timeout_s: float = _doc("A collective waiting longer than this ends the job (a crashed or stuck rank).", 300.0)
    precision: str = _doc("'fp32' or 'bf16'.", "fp32")


@dataclass
class TwistConfig:
    groups: int = _doc("G: data-parallel groups, each training its own subnet; must divide world size.", 1)
    kappa: float = _doc("Keep ratio in (0, 1]: fraction of attention units and MLP neurons per subnet.", 1.0)
    local_steps: int = _doc("H: local steps between aggregations (the paper uses 15).", 15)
    rounds: int = _doc("Rounds of dispatch -> H steps -> aggregate; total steps = rounds * H.", 10)
    shared_layers: list[int] | None = _doc(
        "Layers kept whole in every subnet; default first 2 and last 2 when n_layers >= 6.", None
    )
    correction: str = _doc("Activation-shift correction: 'none', 'scale' or 'mean'.", "none")
    optimizer_state: str = _doc("Optimizer moments across rounds: 'reset' or 'aggregate'.", "reset")
    allow_uncovered: bool = _doc("Allow kappa*G < 1, where some units train in no group.", False)
    stat_momentum: float = _doc("EMA momentum of unit activation means used by correction='mean'.", 0.99)


@dataclass
class EvalConfig:
    every_rounds: int = _doc("Validation perplexity every N rounds (0 disables).", 1)
    max_batches: int = _doc("Validation batches per rank per evaluation.", 8)


@dataclass
class TrackingConfig:
    enabled: bool = _doc("Log to MLflow from rank 0.", True)
    uri: str = _doc("MLflow tracking URI; default sqlite:///<out_dir>/mlflow.db.", "")
    experiment: str = _doc("MLflow experiment name.", "twist-scale")
    run_name: str = _doc("MLflow run name; default the out_dir name.", "")


@dataclass
class CheckpointConfig:
    every_rounds: int = _doc("Save every N rounds (0 disables; the last round is always saved).", 1)
    keep_last: int = _doc("Keep this many newest checkpoints.", 2)
    resume: bool = _doc("Resume from the newest valid checkpoint in out_dir.", True)


@dataclass
class RunConfig:
    out_dir: str = _doc("Run directory: resolved config, checkpoints, MLflow store, logs.", "runs/default")
    seed: int = _doc("Seed for init, data order and subnet sampling.", 0)
    on_nonfinite: str = _doc(
        "A non-finite loss: 'stop' (error; the last checkpoint stays intact) or 'skip' the step.", "stop"
    )
    model: ModelConfig = _doc("Model.", factory=ModelConfig)
    data: DataConfig = _doc("Data.", factory=DataConfig)
    optim: OptimConfig = _doc("Optimizer and schedule.", factory=OptimConfig)
    parallel: ParallelConfig = _doc("Engine and precision.", factory=ParallelConfig)
    twist: TwistConfig = _doc("TwIST subnet training.", factory=TwistConfig)
    eval: EvalConfig = _doc("Validation.", factory=EvalConfig)
    tracking: TrackingConfig = _doc("MLflow.", factory=TrackingConfig)
    checkpoint: CheckpointConfig = _doc("Checkpoints.", factory=CheckpointConfig)

    @property
    def total_steps(self) -> int:
        return self.twist.rounds * self.twist.local_steps

    @property
    def is_dense(self) -> bool:
        """One group training the whole model: TwIST's machinery reduces to the identity."""
        return self.twist.groups == 1 and self.twist.kappa == 1.0


CHOICES: dict[str, tuple[str, ...]] = {
    "on_nonfinite": ("stop", "skip"),
    "model.arch": ("llama", "gpt2"),
    "optim.name": ("adamw", "sgd"),
    "parallel.engine": ("deepspeed", "fsdp", "local"),
    "parallel.precision": ("fp32", "bf16"),
    "twist.correction": ("none", "scale", "mean"),
    "twist.optimizer_state": ("reset", "aggregate"),
}


def _fields(cls: type) -> dict[str, tuple[dataclasses.Field, Any]]:
    hints = typing.get_type_hints(cls)
    return {f.name: (f, hints[f.name]) for f in dataclasses.fields(cls)}


def _coerce(path: str, value: Any, hint: Any) -> Any:
    """Convert a file or CLI value to the field's type, or say which type was expected."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        return _coerce(path, value, args[0])
    if origin is list:
        (item,) = typing.get_args(hint)
        if isinstance(value, str):
            value = [v for v in value.split(",") if v.strip()] if value.strip() else []
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: expected a list, got {value!r}")
        return [_coerce(f"{path}[{i}]", v, item) for i, v in enumerate(value)]
    try:
        if hint is bool:
            if isinstance(value, bool):
                return value
            if str(value).lower() in ("true", "1", "yes"):
                return True
            if str(value).lower() in ("false", "0", "no"):
                return False
            raise ValueError
        if hint is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)
        if hint is float:
            return float(value)
        if hint is str:
            return str(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{path}: expected {hint.__name__}, got {value!r}") from None
    raise ConfigError(f"{path}: unsupported type {hint}")


def _apply(obj: Any, updates: dict[str, Any], prefix: str = "") -> None:
    known = _fields(type(obj))
    for key, value in updates.items():
        path = f"{prefix}{key}"
        if key not in known:
            raise ConfigError(f"unknown config key '{path}'; known keys here: {', '.join(sorted(known))}")
        _, hint = known[key]
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"'{path}' is a section; set its keys, e.g. --{path}.<key> VALUE")
            _apply(current, value, f"{path}.")
        else:
            setattr(obj, key, _coerce(path, value, hint))


def _read_file(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    text = path.read_text()
    if path.suffix == ".toml":
        return tomllib.loads(text)
    if path.suffix in (".yaml", ".yml"):
        return yaml.safe_load(text) or {}
    if path.suffix == ".json":  # the resolved config a run saves
        return json.loads(text)
    raise ConfigError(f"config file {path}: use .toml, .yaml, .yml or .json")


def parse_overrides(argv: list[str]) -> tuple[list[Path], dict[str, Any]]:
    """Split `--config FILE` and `--section.key VALUE` (or `=VALUE`) pairs into a nested dict."""
    files: list[Path] = []
    nested: dict[str, Any] = {}
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--"):
            raise ConfigError(f"unexpected argument '{arg}'; use --section.key VALUE")
        key, eq, value = arg[2:].partition("=")
        if not eq:
            if i + 1 >= len(argv):
                raise ConfigError(f"--{key} needs a value")
            value, i = argv[i + 1], i + 1
        i += 1
        if key == "local_rank":  # the deepspeed launcher appends it; LOCAL_RANK carries the same
            continue
        if key == "config":
            files.append(Path(value))
            continue
        node = nested
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return files, nested


def help_text(program: str) -> str:
    """Every field as its --section.key flag, with its default, allowed values and documentation."""
    lines = [
        f"usage: {program} [--config FILE ...] [--section.key VALUE ...]",
        "",
        "Precedence: --section.key VALUE > --config files (.toml/.yaml/.json, in order) > defaults.",
        "Lists are comma-separated (--data.train_files a.txt,b.txt); booleans are true/false.",
    ]

    def walk(obj: Any, prefix: str) -> None:
        for name, (f, _) in _fields(type(obj)).items():
            value, path = getattr(obj, name), f"{prefix}{name}"
            if dataclasses.is_dataclass(value):
                lines.extend(["", f"{path}: {f.metadata.get('doc', '')}"])
                walk(value, f"{path}.")
                continue
            choices = f" {{{', '.join(CHOICES[path])}}}" if path in CHOICES else ""
            lines.append(f"  --{path}{choices} (default: {json.dumps(value)})")
            lines.append(f"      {f.metadata.get('doc', '')}")

    walk(RunConfig(), "")
    return "\n".join(lines)


def load_config(argv: list[str] | None = None) -> RunConfig:
    """Defaults, then each --config file in order, then dotted overrides; then validate."""
    files, overrides = parse_overrides(sys.argv[1:] if argv is None else argv)
    cfg = RunConfig()
    for path in files:
        _apply(cfg, _read_file(path))
    _apply(cfg, overrides)
    validate(cfg)
    return cfg


def _check_backend(backend: str) -> None:
    """'auto', one torch backend name, or torch's 'device:backend,...' form of known backends."""
    if backend == "auto":
        return
    import torch.distributed as dist

    pairs = [p.strip() for p in backend.split(",")]
    per_device = ":" in backend
    if per_device and any(p.count(":") != 1 or not all(p.split(":")) for p in pairs):
        raise ConfigError(f"--parallel.backend {backend!r}: write the per-device form as 'cpu:gloo,cuda:nccl'")
    if not per_device and len(pairs) > 1:
        raise ConfigError(f"--parallel.backend {backend!r}: name one backend, or use 'cpu:gloo,cuda:nccl'")
    for name in (p.split(":")[-1] for p in pairs):
        if name.lower() not in dist.Backend.backend_list:
            raise ConfigError(
                f"--parallel.backend {backend!r}: unknown backend {name!r}; choose auto, gloo, nccl, a "
                "per-device form such as 'cpu:gloo,cuda:nccl', or register it with "
                "torch.distributed.Backend.register_backend"
            )


def validate(cfg: RunConfig, world_size: int | None = None) -> None:
    """Reject values that cannot run, naming the flag and what is allowed."""
    for path, allowed in CHOICES.items():
        node = cfg
        for part in path.split("."):
            node = getattr(node, part)
        value = node
        if value not in allowed:
            raise ConfigError(f"--{path} {value!r} is not allowed; choose one of {', '.join(allowed)}")
    _check_backend(cfg.parallel.backend)
    t = cfg.twist
    if not 0.0 < t.kappa <= 1.0:
        raise ConfigError(f"--twist.kappa {t.kappa} must be in (0, 1]")
    positive = {
        "twist.groups": t.groups,
        "twist.local_steps": t.local_steps,
        "twist.rounds": t.rounds,
        "data.block_size": cfg.data.block_size,
        "data.micro_batch_size": cfg.data.micro_batch_size,
        "data.vocab_size": cfg.data.vocab_size,
    }
    for path, value in positive.items():
        if value < 1:
            raise ConfigError(f"--{path} {value} must be >= 1")
    if cfg.parallel.timeout_s <= 0:
        raise ConfigError(f"--parallel.timeout_s {cfg.parallel.timeout_s} must be > 0")
    if cfg.optim.lr <= 0:
        raise ConfigError(f"--optim.lr {cfg.optim.lr} must be > 0")
    if t.kappa * t.groups < 1 and not t.allow_uncovered:
        raise ConfigError(
            f"--twist.kappa {t.kappa} with --twist.groups {t.groups} leaves units that no group trains "
            f"(kappa*groups = {t.kappa * t.groups:.2f} < 1); raise kappa or groups, or set "
            "--twist.allow_uncovered true"
        )
    if not 0.0 <= t.stat_momentum < 1.0:
        raise ConfigError(f"--twist.stat_momentum {t.stat_momentum} must be in [0, 1)")
    if not cfg.data.train_files and not cfg.data.hub_dataset:
        raise ConfigError("no training data: set --data.train_files FILE[,FILE] or --data.hub_dataset NAME")
    for path in [*cfg.data.train_files, *cfg.data.valid_files]:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"data file {path} does not exist; fix --data.train_files / --data.valid_files")
        if p.stat().st_size == 0:
            raise ConfigError(f"data file {path} is empty; point --data.train_files at real text")
    if cfg.parallel.engine == "deepspeed" and not Path(cfg.parallel.ds_config).is_file():
        raise ConfigError(f"--parallel.ds_config {cfg.parallel.ds_config} does not exist; see ds_configs/")
    if world_size is not None:
        if world_size % t.groups:
            raise ConfigError(
                f"--twist.groups {t.groups} does not divide the world size {world_size}; "
                f"use a divisor of {world_size} or launch a multiple of {t.groups} processes"
            )
        if cfg.parallel.engine == "local" and world_size != t.groups:
            raise ConfigError(
                f"--parallel.engine local runs one process per group, but the world size is {world_size} for "
                f"{t.groups} group(s); launch {t.groups} process(es) or use --parallel.engine deepspeed|fsdp"
            )


def to_dict(cfg: RunConfig) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def flat_params(cfg: RunConfig) -> dict[str, str]:
    """Flattened `section.key -> value` for MLflow params."""
    out: dict[str, str] = {}
    for section, values in to_dict(cfg).items():
        if isinstance(values, dict):
            for k, v in values.items():
                out[f"{section}.{k}"] = json.dumps(v) if isinstance(v, (list, dict)) else str(v)
        else:
            out[section] = str(values)
    return out


def save_resolved(cfg: RunConfig, path: Path) -> None:
    atomic_write_text(path, json.dumps(to_dict(cfg), indent=2))
