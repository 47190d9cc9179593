"""GPT-2: presets, unit map (one head in the fused c_attn; one MLP neuron) and export hooks."""

from __future__ import annotations

import copy

from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel, PretrainedConfig

from twist_scale.models.base import Architecture, AxisSlice, UnitBlock, Widths

PRESETS: dict[str, dict] = {
    "tiny": dict(n_embd=64, n_layer=4, n_head=4, n_positions=512),
    "small": dict(n_embd=384, n_layer=6, n_head=6, n_positions=1024),
}


def from_preset(preset: dict, vocab_size: int) -> nn.Module:
    config = GPT2Config(vocab_size=vocab_size, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **preset)
    return GPT2LMHeadModel(config)


def unit_blocks(cfg: PretrainedConfig) -> list[UnitBlock]:
    e, head_dim = cfg.n_embd, cfg.n_embd // cfg.n_head
    inner = cfg.n_inner or 4 * e
    groups = []
    for i in range(cfg.n_layer):
        a, m = f"transformer.h.{i}.attn", f"transformer.h.{i}.mlp"
        # c_attn is a fused Conv1D (in, 3E): the q, k and v columns of head h sit in three segments.
        qkv = tuple((s * e, head_dim) for s in range(3))
        attn = (
            AxisSlice(f"{a}.c_attn.weight", 1, segments=qkv),
            AxisSlice(f"{a}.c_attn.bias", 0, segments=qkv),
            AxisSlice(f"{a}.c_proj.weight", 0, head_dim),
        )
        mlp = (
            AxisSlice(f"{m}.c_fc.weight", 1, 1),
            AxisSlice(f"{m}.c_fc.bias", 0, 1),
            AxisSlice(f"{m}.c_proj.weight", 0, 1),
        )
        groups.append(UnitBlock(i, "attn", cfg.n_head, attn, f"{a}.c_proj", 0))
        groups.append(UnitBlock(i, "mlp", inner, mlp, f"{m}.c_proj", 0))
    return groups


def shrunk_config(cfg: PretrainedConfig, widths: Widths) -> PretrainedConfig | None:
    mlp = {w["mlp"] for w in widths.values()}
    if any(w["attn"] != cfg.n_head for w in widths.values()) or len(mlp) > 1:
        return None  # GPT-2's head size is n_embd // n_head: fewer heads cannot be written in its config
    new = copy.deepcopy(cfg)
    new.n_inner = mlp.pop()
    return new


GPT2 = Architecture(
    model_type="gpt2",
    presets=PRESETS,
    from_preset=from_preset,
    unit_blocks=unit_blocks,
    num_layers=lambda cfg: cfg.n_layer,
    enable_bias=lambda model: None,  # Conv1D projections always carry a bias
    shrunk_config=shrunk_config,
)
