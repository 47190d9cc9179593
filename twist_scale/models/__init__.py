"""Model presets and per-architecture specs: one `Architecture` per supported Hugging Face model type.

Each architecture's module (`llama.py` for Llama and the decoders shaped like it, `phi3.py`, `gpt2.py`)
holds all the code knows about it: presets, the unit map, and what export needs (enabling biases to
fold a shift into, the config that states a subnet's widths). Everything else is generic over
`Architecture`; `widths.py` makes any sliced model's modules agree with their weights.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from twist_scale.config import ConfigError
from twist_scale.models.base import Architecture, AxisSlice, UnitBlock, Widths, units_to_keep
from twist_scale.models.gpt2 import GPT2
from twist_scale.models.llama import GEMMA2, GEMMA3, LLAMA, MISTRAL, QWEN2, QWEN3
from twist_scale.models.phi3 import PHI3

__all__ = [
    "ARCHITECTURES",
    "PRESETS",
    "Architecture",
    "AxisSlice",
    "UnitBlock",
    "Widths",
    "architecture_for",
    "architecture_of",
    "build_model",
    "units_to_keep",
]

ARCHITECTURES: dict[str, Architecture] = {
    a.model_type: a for a in (LLAMA, MISTRAL, QWEN2, QWEN3, PHI3, GEMMA2, GEMMA3, GPT2)
}
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
        return model
    spec = ARCHITECTURES[arch]
    if size not in spec.presets:
        raise ValueError(f"--model.size {size!r} is not a {arch} preset; choose one of {', '.join(spec.presets)}")
    return spec.from_preset(spec.presets[size], vocab_size)


def architecture_of(model: nn.Module) -> Architecture:
    return architecture_for(model.config.model_type)


def architecture_for(model_type: str) -> Architecture:
    if model_type not in ARCHITECTURES:
        raise ConfigError(
            f"model type {model_type!r} is not supported; supported: {', '.join(ARCHITECTURES)} "
            "(docs/architectures.md says how to add one)"
        )
    return ARCHITECTURES[model_type]
