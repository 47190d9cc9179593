"""Make a narrower model's modules agree with their weights: the one fix-up slicing needs.

Slicing replaces weights with smaller ones; modules still cache the old widths (a Linear's
`out_features`, GPT-2's `split_size`, Phi-3's query/key split, which it reads from its config).
Everything here is read back from the weights, so one function serves every architecture.

Self-contained on purpose (torch and transformers only): an adaptive-width export carries a copy as
part of its remote code, so it loads where twist-scale is not installed.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D


def fit_modules_to_weights(model: nn.Module) -> None:
    """Every module states the widths its (sliced) weights now have."""
    for module in model.modules():
        if isinstance(module, nn.Linear):
            module.out_features, module.in_features = module.weight.shape
        elif isinstance(module, Conv1D):
            module.nx, module.nf = module.weight.shape
    for module in model.modules():
        if isinstance(getattr(module, "c_attn", None), Conv1D) and hasattr(module, "split_size"):
            module.split_size = module.c_attn.nf // 3  # GPT-2: q, k and v columns fused
            module.num_heads = module.split_size // module.head_dim
        elif isinstance(getattr(module, "qkv_proj", None), nn.Linear):  # Phi-3: rows split by the config's heads
            heads = module.o_proj.in_features // module.head_dim
            module.num_key_value_heads = (module.qkv_proj.out_features - module.o_proj.in_features) // (
                2 * module.head_dim
            )
            module.config = copy.copy(module.config)  # this layer's widths only
            module.config.num_attention_heads = heads


def resize(model: nn.Module, shapes: dict[str, list[int]]) -> None:
    """Give the named parameters these shapes (uninitialised; a checkpoint fills them), adding those
    the model lacks (a bias the config cannot state), then fit the modules to them."""
    for name, shape in shapes.items():
        module_name, _, attr = name.rpartition(".")
        module = model.get_submodule(module_name)
        like = module.weight
        setattr(module, attr, nn.Parameter(torch.empty(shape, dtype=like.dtype, device=like.device)))
    fit_modules_to_weights(model)
