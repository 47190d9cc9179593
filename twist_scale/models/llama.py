"""Llama: presets, unit map (a KV group with its query heads; one MLP neuron), fix-ups and export hooks."""

from __future__ import annotations

import copy

from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM, PretrainedConfig

from twist_scale.models.base import Architecture, AxisSlice, UnitBlock, Widths, fix_linear_and_conv

PRESETS: dict[str, dict] = {
    # GQA (2 query heads per KV head) so tests cover grouped units; 6 layers exercise shared layers.
    "tiny": dict(
        hidden_size=64,
        num_hidden_layers=6,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        max_position_embeddings=512,
    ),
    "tiny-mha": dict(
        hidden_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        intermediate_size=128,
        max_position_embeddings=512,
    ),
    "small": dict(
        hidden_size=384,
        num_hidden_layers=6,
        num_attention_heads=6,
        num_key_value_heads=6,
        intermediate_size=1536,
        max_position_embeddings=1024,
    ),
    "medium": dict(
        hidden_size=512,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=8,
        intermediate_size=2048,
        max_position_embeddings=1024,
    ),
}


def from_preset(preset: dict, vocab_size: int) -> nn.Module:
    return LlamaForCausalLM(LlamaConfig(vocab_size=vocab_size, tie_word_embeddings=False, **preset))


def unit_blocks(cfg: PretrainedConfig) -> list[UnitBlock]:
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    q_per_kv = cfg.num_attention_heads // cfg.num_key_value_heads
    groups = []
    for i in range(cfg.num_hidden_layers):
        a, m = f"model.layers.{i}.self_attn", f"model.layers.{i}.mlp"
        attn = [
            AxisSlice(f"{a}.q_proj.weight", 0, q_per_kv * head_dim),
            AxisSlice(f"{a}.k_proj.weight", 0, head_dim),
            AxisSlice(f"{a}.v_proj.weight", 0, head_dim),
            AxisSlice(f"{a}.o_proj.weight", 1, q_per_kv * head_dim),
        ]
        if getattr(cfg, "attention_bias", False):
            attn += [
                AxisSlice(f"{a}.q_proj.bias", 0, q_per_kv * head_dim),
                AxisSlice(f"{a}.k_proj.bias", 0, head_dim),
                AxisSlice(f"{a}.v_proj.bias", 0, head_dim),
            ]
        mlp = [
            AxisSlice(f"{m}.gate_proj.weight", 0, 1),
            AxisSlice(f"{m}.up_proj.weight", 0, 1),
            AxisSlice(f"{m}.down_proj.weight", 1, 1),
        ]
        if getattr(cfg, "mlp_bias", False):
            mlp += [AxisSlice(f"{m}.gate_proj.bias", 0, 1), AxisSlice(f"{m}.up_proj.bias", 0, 1)]
        groups.append(UnitBlock(i, "attn", cfg.num_key_value_heads, tuple(attn), f"{a}.o_proj", 1))
        groups.append(UnitBlock(i, "mlp", cfg.intermediate_size, tuple(mlp), f"{m}.down_proj", 1))
    return groups


def fix_module_attrs(model: nn.Module, cfg: PretrainedConfig) -> None:
    fix_linear_and_conv(model)  # attention reshapes with -1 heads, so widths are all it needs


def enable_bias(model: nn.Module) -> None:
    """Llama has no biases: turn on attention_bias and mlp_bias (HF then gives all 4 / all 3 projections
    a bias) with zero biases, so a shift can be folded into o_proj / down_proj."""
    model.config.attention_bias = model.config.mlp_bias = True
    for layer in model.model.layers:
        a, m = layer.self_attn, layer.mlp
        for module in (a.q_proj, a.k_proj, a.v_proj, a.o_proj, m.gate_proj, m.up_proj, m.down_proj):
            if module.bias is None:
                module.bias = nn.Parameter(module.weight.new_zeros(module.out_features))


def shrunk_config(cfg: PretrainedConfig, widths: Widths) -> PretrainedConfig | None:
    attn = {w["attn"] for w in widths.values()}
    mlp = {w["mlp"] for w in widths.values()}
    if len(attn) > 1 or len(mlp) > 1:
        return None
    new = copy.deepcopy(cfg)
    new.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads  # no longer derivable
    q_per_kv = cfg.num_attention_heads // cfg.num_key_value_heads
    new.num_key_value_heads = attn.pop()
    new.num_attention_heads = new.num_key_value_heads * q_per_kv
    new.intermediate_size = mlp.pop()
    if new.hidden_size % new.num_attention_heads:
        return None  # transformers refuses to save such a config, even with head_dim explicit
    return new


LLAMA = Architecture(
    model_type="llama",
    presets=PRESETS,
    from_preset=from_preset,
    unit_blocks=unit_blocks,
    fix_module_attrs=fix_module_attrs,
    num_layers=lambda cfg: cfg.num_hidden_layers,
    enable_bias=enable_bias,
    shrunk_config=shrunk_config,
)
