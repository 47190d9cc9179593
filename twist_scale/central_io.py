"""The trained central model on disk: a plain Hugging Face checkpoint plus TwIST's side files.

`final/` loads with `AutoModelForCausalLM.from_pretrained` as the full-width model; `twist.json`
records how it was trained (kappa, correction, shared layers) and `twist_stats.safetensors` holds
the unit activation means that correction='mean' folds into exported subnets.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

TWIST_META = "twist.json"
TWIST_STATS = "twist_stats.safetensors"


def save_central(
    directory: Path,
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    stats: dict[str, torch.Tensor],
    meta: dict[str, Any],
) -> None:
    """Written to a temporary directory and renamed, so a crash never leaves half a model."""
    tmp = directory.with_name(f".tmp-{directory.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    if stats:
        save_file({k: v.contiguous() for k, v in stats.items()}, str(tmp / TWIST_STATS))
    (tmp / TWIST_META).write_text(json.dumps(meta, indent=2))
    shutil.rmtree(directory, ignore_errors=True)
    tmp.rename(directory)


def load_central(directory: Path) -> tuple[nn.Module, PreTrainedTokenizerBase, dict[str, torch.Tensor], dict]:
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(directory)
    stats_file = directory / TWIST_STATS
    stats = load_file(str(stats_file)) if stats_file.exists() else {}
    meta = json.loads((directory / TWIST_META).read_text()) if (directory / TWIST_META).exists() else {}
    return model, tokenizer, stats, meta
