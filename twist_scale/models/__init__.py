"""Model presets and per-architecture specs: one `Architecture` per supported Hugging Face model type.

Each architecture's module (`llama.py`, `gpt2.py`) holds all the code knows about it: presets, the
unit map, the fix-ups a sliced model needs, and what export needs (enabling biases to fold a shift
into, the config that states a subnet's widths). Everything else is generic over `Architecture`.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from twist_scale.models.base import Architecture, AxisSlice, UnitBlock, Widths, units_to_keep
from twist_scale.models.gpt2 import GPT2
from twist_scale.models.llama import LLAMA

__all__ = [
    "ARCHITECTURES",
    "PRESETS",
    "Architecture",
    "AxisSlice",
    "UnitBlock",
    "Widths",
    "architecture_of",
    "build_model",
    "units_to_keep",
]

ARCHITECTURES: dict[str, Architecture] = {a.model_type: a for a in (LLAMA, GPT2)}
PRESETS: dict[str, dict[str, dict]] = {name: a.presets for name, a in ARCHITECTURES.items()}


def build_model(arch: str, size: str, vocab_size: int, pretrained: str = "", weights: bool = True) -> nn.Module:
    """A full-width model from a preset (seeded by the caller) or a from_pretrained directory/hub id.

    weights=False: a pretrained model's architecture only (under the meta device: no memory at all).
    """
    if pretrained:
        if weights:
            model = AutoModelForCausalLM.from_pretrained(pretrained, dtype=torch.float32)
        else:
            model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(pretrained), dtype=torch.float32)
        if model.config.vocab_size < vocab_size:
            raise ValueError(
                f"tokenizer has {vocab_size} tokens but the pretrained model only {model.config.vocab_size}; "
                "use the model's own tokenizer (--data.tokenizer) or a matching checkpoint"
            )
        return model
    spec = ARCHITECTURES[arch]
    if size not in spec.presets:
        raise ValueError(f"--model.size {size!r} is not a {arch} preset; choose one of {', '.join(spec.presets)}")
    return spec.from_preset(spec.presets[size], vocab_size)


def architecture_of(model: nn.Module) -> Architecture:
    kind = model.config.model_type
    if kind not in ARCHITECTURES:
        raise ValueError(f"model type {kind!r} has no unit map; supported: {', '.join(ARCHITECTURES)}")
    return ARCHITECTURES[kind]
