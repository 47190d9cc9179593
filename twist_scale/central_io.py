"""The trained central model on disk: a plain Hugging Face checkpoint plus TwIST's side files.

`final/` loads with `AutoModelForCausalLM.from_pretrained` as the full-width model; `twist.json`
records how it was trained (kappa, correction, shared layers) and `twist_stats.safetensors` holds
the unit activation means that correction='mean' folds into exported subnets.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
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


def training_record(cfg: RunConfig, topo: Topology, rounds: int, shared_layers: list[int]) -> dict[str, Any]:
    """How the central model was trained: twist.json beside its weights, read by export and evaluation."""
    tokens_per_step = cfg.data.micro_batch_size * cfg.data.block_size * topo.world_size
    return {
        "kappa": cfg.twist.kappa,
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
        tokenizer.save_pretrained(tmp)
        if stats:
            save_file({k: v.contiguous() for k, v in stats.items()}, str(tmp / TWIST_STATS))
        (tmp / TWIST_META).write_text(json.dumps(meta, indent=2))


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
) -> None:
    """Assemble the full-width central model on rank 0 and save it with `save_central`.

    `full_state` is collective (every rank iterates it); only rank 0 keeps the tensors and `build`s
    an empty model of the architecture to load them into. The only moment a rank holds the whole model.
    """
    weights, stats = {}, {}
    for name, full in full_state:
        if is_main:
            (stats if is_statistic(name) else weights)[name] = full.clone()
    if not is_main:
        return
    model = build()
    missing, unexpected = model.load_state_dict(weights, strict=False)
    tied = {k for k in model.state_dict() if k not in dict(model.named_parameters())}  # e.g. GPT-2 lm_head
    if unexpected or set(missing) - tied:
        raise RuntimeError(f"central model does not fit its architecture: {missing=} {unexpected=}")
    model.tie_weights()
    save_central(directory, model, tokenizer, stats, meta)
