"""The trained central model on disk: a plain Hugging Face checkpoint plus TwIST's side files.

`final/` loads with `AutoModelForCausalLM.from_pretrained` as the full-width model; `twist.json`
records how it was trained (each group's kappa, correction, shared layers) and `twist_stats.safetensors` holds
the unit activation means that correction='mean' folds into exported subnets.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from twist_scale.atomic import atomic_directory
from twist_scale.config import RunConfig
from twist_scale.correction import is_statistic
from twist_scale.topology import Topology

TWIST_META = "twist.json"
TWIST_STATS = "twist_stats.safetensors"
SAFE_WEIGHTS_NAME = "model.safetensors"
SAFE_WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
EXPORT_SHARD_BYTES = 2 * 2**30  # what rank 0 holds at most while it streams the export


def training_record(cfg: RunConfig, topo: Topology, rounds: int, shared_layers: list[int]) -> dict[str, Any]:
    """How the central model was trained: twist.json beside its weights, read by export and evaluation."""
    tokens_per_step = cfg.tokens_per_rank_step * topo.world_size
    return {
        "kappas": list(cfg.twist.kappas),  # one per group
        "groups": topo.groups,
        "rounds": rounds,
        "correction": cfg.twist.correction,
        "shared_layers": shared_layers,
        "seed": cfg.seed,
        "tokens": rounds * cfg.twist.local_steps * tokens_per_step,
    }


def save_central(
    directory: Path,
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    stats: dict[str, torch.Tensor],
    meta: dict[str, Any],
) -> None:
    """Written to a temporary directory and renamed, so a crash never leaves half a model."""
    with atomic_directory(directory) as tmp:
        model.save_pretrained(tmp)
        _save_side_files(tmp, tokenizer, stats, meta)


def _save_side_files(
    directory: Path, tokenizer: PreTrainedTokenizerBase, stats: dict[str, torch.Tensor], meta: dict[str, Any]
) -> None:
    tokenizer.save_pretrained(directory)
    if stats:
        save_file({k: v.contiguous() for k, v in stats.items()}, str(directory / TWIST_STATS))
    (directory / TWIST_META).write_text(json.dumps(meta, indent=2))


def load_central(directory: Path) -> tuple[nn.Module, PreTrainedTokenizerBase, dict[str, torch.Tensor], dict]:
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(directory)
    stats_file = directory / TWIST_STATS
    stats = load_file(str(stats_file)) if stats_file.exists() else {}
    meta = json.loads((directory / TWIST_META).read_text()) if (directory / TWIST_META).exists() else {}
    return model, tokenizer, stats, meta


def export_central(
    directory: Path,
    full_state: Iterable[tuple[str, torch.Tensor]],
    build: Callable[[], nn.Module],
    tokenizer: PreTrainedTokenizerBase,
    meta: dict[str, Any],
    is_main: bool,
    shard_bytes: int = EXPORT_SHARD_BYTES,
) -> None:
    """Stream the full-width central model into a sharded Hugging Face checkpoint on rank 0.

    `full_state` is collective (every rank iterates it, one tensor at a time); rank 0 writes each
    safetensors shard once it reaches `shard_bytes`, so it never holds more than one shard. `build`
    gives the architecture (built on the meta device: only its config and names are used). The
    layout is `save_pretrained`'s: `model-0000i-of-0000n.safetensors` and an index when there are
    several, so plain `from_pretrained` loads it.
    """
    with torch.device("meta"):
        model = build() if is_main else None
    expected = dict(model.named_parameters()) if is_main else {}
    with atomic_directory(directory) if is_main else nullcontext(None) as tmp:
        shards: list[dict[str, torch.Tensor]] = [{}]
        written, stats, size, problems = [], {}, 0, []
        for name, full in full_state:  # every rank takes part in every gather, whatever rank 0 finds
            if not is_main:
                continue
            if is_statistic(name):
                stats[name] = full.clone()
                continue
            if name not in expected or expected.pop(name).shape != full.shape:
                problems.append(name)
                continue
            if size and size + full.numel() * 4 > shard_bytes:
                written.append(_write_shard(tmp, shards.pop(), len(written)))
                shards, size = [{}], 0
            shards[-1][name] = full.to(torch.float32).contiguous().clone()
            size += full.numel() * 4
        if not is_main:
            return
        if problems or expected:
            raise RuntimeError(
                f"central model does not fit its architecture: unexpected or misshapen {problems}, missing "
                f"{sorted(expected)}"
            )
        written.append(_write_shard(tmp, shards.pop(), len(written)))
        _name_shards(tmp, written)
        model.config.save_pretrained(tmp)
        if model.can_generate():
            model.generation_config.save_pretrained(tmp)
        _save_side_files(tmp, tokenizer, stats, meta)


def _write_shard(directory: Path, tensors: dict[str, torch.Tensor], index: int) -> tuple[Path, list[str], int]:
    path = directory / f"shard-{index:05d}.safetensors"
    save_file(tensors, str(path), metadata={"format": "pt"})
    return path, list(tensors), sum(t.numel() * t.element_size() for t in tensors.values())


def _name_shards(directory: Path, written: list[tuple[Path, list[str], int]]) -> None:
    """save_pretrained's names: one model.safetensors, or numbered shards and their index."""
    if len(written) == 1:
        written[0][0].rename(directory / SAFE_WEIGHTS_NAME)
        return
    weight_map = {}
    for i, (path, names, _) in enumerate(written):
        final = f"model-{i + 1:05d}-of-{len(written):05d}.safetensors"
        path.rename(directory / final)
        weight_map |= dict.fromkeys(names, final)
    index = {"metadata": {"total_size": sum(size for *_, size in written)}, "weight_map": weight_map}
    (directory / SAFE_WEIGHTS_INDEX_NAME).write_text(json.dumps(index, indent=2))
