"""A run's config from defaults, TOML/YAML/JSON files and dotted CLI overrides, validated.

Precedence is CLI > file > defaults. Everything is validated before any process group, model
or dataset is built, so a typo costs a second, not a queued job.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import types
import typing
from pathlib import Path
from typing import Any

import tomllib
import yaml

from twist_scale.config import DATA_ROOT_ENV, DEFAULT_DATA_ROOT, ConfigError, DataConfig, RunConfig
from twist_scale.config_validate import allowed_values, check_choice, fields_of, validate


def _coerce(path: str, value: Any, hint: Any) -> Any:
    """Convert a file or CLI value to the field's type, or say which type was expected."""
    origin = typing.get_origin(hint)
    if (allowed := allowed_values(hint)) is not None:
        check_choice(path, str(value), allowed)
        return str(value)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        word = value.strip().lower() if isinstance(value, str) else None
        if typing.get_origin(args[0]) is list and word in ("auto", "none"):
            return None if word == "auto" else []  # 'auto': the field's default rule; 'none': an empty list
        if value is None or word in ("none", "null"):
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
    known = fields_of(type(obj))
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
        for name, (f, hint) in fields_of(type(obj)).items():
            value, path = getattr(obj, name), f"{prefix}{name}"
            if dataclasses.is_dataclass(value):
                lines.extend(["", f"{path}: {f.metadata.get('doc', '')}"])
                walk(value, f"{path}.")
                continue
            allowed = allowed_values(hint)
            choices = f" {{{', '.join(allowed)}}}" if allowed else ""
            shown = "auto" if value is None else json.dumps(value)  # None is what 'auto' parses to
            lines.append(f"  --{path}{choices} (default: {shown})")
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
    _resolve_data_root(cfg.data)
    launched = os.environ.get("WORLD_SIZE")  # every launcher sets it: groups are checked before any process group
    validate(cfg, int(launched) if launched else None)
    return cfg


def _resolve_data_root(data: DataConfig) -> None:
    """Expand '{data_root}' in the data paths: --data.root, else $TWIST_DATA_ROOT, else ../shared/data."""
    data.root = data.root or os.environ.get(DATA_ROOT_ENV, "") or DEFAULT_DATA_ROOT
    data.train_files = [f.replace("{data_root}", data.root) for f in data.train_files]
    data.valid_files = [f.replace("{data_root}", data.root) for f in data.valid_files]
