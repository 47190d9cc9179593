"""Whether a run's config can run: a value that cannot is named with its flag and what is allowed.

Apart from reading the config (`config_load.py`) because a config need not come from the command line:
the trainer checks the one it is given against the world it starts in, built in code or not. The field
and choice helpers live here, as the schema that reading a config uses too.
"""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path
from typing import Any

from twist_scale.config import ConfigError, RunConfig


def fields_of(cls: type) -> dict[str, tuple[dataclasses.Field, Any]]:
    hints = typing.get_type_hints(cls)
    return {f.name: (f, hints[f.name]) for f in dataclasses.fields(cls)}


def allowed_values(hint: Any) -> tuple[str, ...] | None:
    """The allowed values of a `Literal[...]` field; None for any other type."""
    return typing.get_args(hint) if typing.get_origin(hint) is typing.Literal else None


def check_choice(path: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"--{path} {value!r} is not allowed; choose one of {', '.join(allowed)}")


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


def _check_choices(obj: Any, prefix: str = "") -> None:
    """Every `Literal` field holds one of its values, also when the config was built in code."""
    for name, (_, hint) in fields_of(type(obj)).items():
        value = getattr(obj, name)
        if dataclasses.is_dataclass(value):
            _check_choices(value, f"{prefix}{name}.")
        elif (allowed := allowed_values(hint)) is not None:
            check_choice(f"{prefix}{name}", value, allowed)


def _check_distillation(cfg: RunConfig) -> None:
    t = cfg.twist
    if t.distill == "none":
        return
    if t.distill_weight < 0 or t.distill_temperature <= 0 or t.distill_top_k < 1:
        raise ConfigError(
            f"--twist.distill_weight {t.distill_weight}, --twist.distill_temperature {t.distill_temperature} and "
            f"--twist.distill_top_k {t.distill_top_k} must be >= 0, > 0 and >= 1"
        )
    if t.distill == "central" and cfg.is_dense:
        raise ConfigError(
            "--twist.distill central: a dense run has no central model besides the one it trains; use "
            "--twist.distill stored with a teacher checkpoint, or train subnets (--twist.kappa < 1)"
        )
    if t.distill == "stored" and not (t.distill_teacher or cfg.model.pretrained):
        raise ConfigError(
            "--twist.distill stored needs a teacher: --twist.distill_teacher DIR (a Hugging Face checkpoint "
            "sharing the run's tokenizer, e.g. a dense run's final/) or --model.pretrained"
        )


def validate(cfg: RunConfig, world_size: int | None = None) -> None:
    """Reject values that cannot run, naming the flag and what is allowed."""
    _check_choices(cfg)
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
        "optim.grad_accum_steps": cfg.optim.grad_accum_steps,
    }
    for path, value in positive.items():
        if value < 1:
            raise ConfigError(f"--{path} {value} must be >= 1")
    if cfg.optim.grad_accum_steps > 1 and cfg.on_nonfinite == "skip":
        raise ConfigError(
            "--on_nonfinite skip with --optim.grad_accum_steps > 1: a step is skipped before its backward, and "
            "an accumulated step has already run some; use --on_nonfinite stop, or accumulate 1"
        )
    if cfg.parallel.timeout_s <= 0:
        raise ConfigError(f"--parallel.timeout_s {cfg.parallel.timeout_s} must be > 0")
    if cfg.data.num_proc < 0:
        raise ConfigError(f"--data.num_proc {cfg.data.num_proc} must be >= 0 (0: one per core)")
    if cfg.data.prepare_timeout_s <= 0:
        raise ConfigError(f"--data.prepare_timeout_s {cfg.data.prepare_timeout_s} must be > 0")
    if cfg.optim.lr <= 0:
        raise ConfigError(f"--optim.lr {cfg.optim.lr} must be > 0")
    if t.group_kappas:
        if len(t.group_kappas) != t.groups:
            raise ConfigError(
                f"--twist.group_kappas has {len(t.group_kappas)} values for --twist.groups {t.groups}: "
                "give one keep ratio per group, or leave it empty to use --twist.kappa for every group"
            )
        for g, kappa in enumerate(t.group_kappas):
            if not 0.0 < kappa <= 1.0:
                raise ConfigError(f"--twist.group_kappas value {kappa} (group {g}) must be in (0, 1]")
    if sum(t.kappas) < 1 and not t.allow_uncovered:
        flag = "group_kappas" if t.group_kappas else "kappa"
        raise ConfigError(
            f"--twist.{flag} {','.join(map(str, t.kappas)) if t.group_kappas else t.kappa} with --twist.groups "
            f"{t.groups} leaves units that no group trains (the groups' keep ratios sum to {sum(t.kappas):.2f} < 1); "
            f"raise {flag} or groups, or set --twist.allow_uncovered true"
        )
    if t.sampling == "nested" and max(t.kappas) < 1 and not t.allow_uncovered:
        raise ConfigError(
            f"--twist.sampling nested with keep ratios {','.join(map(str, t.kappas))}: every group trains the same "
            "first units, so the rest would never train; give one group the full width (e.g. --twist.groups 2 "
            "--twist.group_kappas 1.0,0.5), or set --twist.allow_uncovered true"
        )
    if t.sampling == "rewired" and (t.correction != "mean" or sum(t.kappas) <= 1):
        raise ConfigError(
            f"--twist.sampling rewired with correction {t.correction!r} and keep ratios summing to "
            f"{sum(t.kappas):.2f}: it ranks units by the statistics correction 'mean' keeps, and shares the top "
            "ones among groups only where the groups hold more than every unit once; set --twist.correction mean "
            "and keep ratios summing to more than 1 (e.g. --twist.groups 2 --twist.kappa 0.75, or group_kappas 1.0,0.5)"
        )
    if t.bucket_mb <= 0:
        raise ConfigError(f"--twist.bucket_mb {t.bucket_mb} must be > 0")
    if t.wire_dtype != "fp32" and t.aggregation == "dense":
        raise ConfigError(
            "--twist.wire_dtype bf16 needs --twist.aggregation packed: the dense reduce-scatter would also "
            "accumulate in bf16"
        )
    if not 0.0 <= t.stat_momentum < 1.0:
        raise ConfigError(f"--twist.stat_momentum {t.stat_momentum} must be in [0, 1)")
    _check_distillation(cfg)
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
