"""Llama and the decoders shaped like it: Mistral, Qwen2, Qwen3, Gemma 2 and Gemma 3.

They share one layout (`model.layers.i.self_attn.{q,k,v,o}_proj`, `mlp.{gate,up,down}_proj`), so one
unit map serves them all: an attention unit is a KV group with its query heads, an MLP unit one
neuron. What differs is data: which projections carry biases (Qwen2's q/k/v always, Llama's, Qwen3's
and Gemma's when `attention_bias`), and whether the config can state the biases a folded 'mean'
correction adds (only Llama's `attention_bias` + `mlp_bias`). Their per-head q/k norms (Qwen3,
Gemma 3) have one weight of head_dim shared by every head, and Gemma's embedding scale, soft-capping
and sliding windows do not depend on widths, so none of them is sliced.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

from torch import nn
from transformers import (
    Gemma2Config,
    Gemma2ForCausalLM,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    PretrainedConfig,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from twist_scale.models.base import Architecture, AxisSlice, UnitBlock, Widths

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
    # Llama 3's shapes, for runs from scratch and for measuring one rank of a run at that size
    "8b": dict(
        hidden_size=4096,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        intermediate_size=14336,
        max_position_embeddings=8192,
        rope_theta=500000.0,
    ),
    "70b": dict(
        hidden_size=8192,
        num_hidden_layers=80,
        num_attention_heads=64,
        num_key_value_heads=8,
        intermediate_size=28672,
        max_position_embeddings=8192,
        rope_theta=500000.0,
    ),
}

TINY = {"tiny": PRESETS["tiny"] | {"head_dim": 16}}  # the other decoders: one preset, for tests and trials


def unit_blocks(cfg: PretrainedConfig, qkv_bias: bool) -> list[UnitBlock]:
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
        if qkv_bias:  # a query or key/value row's bias goes with its row
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


def _zero_bias(module: nn.Linear) -> None:
    if module.bias is None:
        module.bias = nn.Parameter(module.weight.new_zeros(module.out_features))


def enable_llama_bias(model: nn.Module) -> None:
    """Llama's config can state every bias: attention_bias and mlp_bias give all 4 / all 3 projections
    one, so all get zero biases and the export stays a plain Llama checkpoint."""
    model.config.attention_bias = model.config.mlp_bias = True
    for layer in model.model.layers:
        a, m = layer.self_attn, layer.mlp
        for module in (a.q_proj, a.k_proj, a.v_proj, a.o_proj, m.gate_proj, m.up_proj, m.down_proj):
            _zero_bias(module)


def enable_output_bias(model: nn.Module) -> None:
    """The other decoders' configs cannot state a down_proj bias (or, for some, an o_proj one): only the
    two output projections get one, and the export loads through its remote code."""
    for layer in model.model.layers:
        _zero_bias(layer.self_attn.o_proj)
        _zero_bias(layer.mlp.down_proj)


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


def decoder(
    model_type: str,
    presets: dict[str, dict],
    config_class: type[PretrainedConfig],
    model_class: type[nn.Module],
    qkv_bias: Callable[[PretrainedConfig], bool],
    enable_bias: Callable[[nn.Module], None] = enable_output_bias,
) -> Architecture:
    def from_preset(preset: dict, vocab_size: int) -> nn.Module:
        return model_class(config_class(vocab_size=vocab_size, tie_word_embeddings=False, **preset))

    return Architecture(
        model_type=model_type,
        presets=presets,
        from_preset=from_preset,
        unit_blocks=lambda cfg: unit_blocks(cfg, qkv_bias(cfg)),
        num_layers=lambda cfg: cfg.num_hidden_layers,
        enable_bias=enable_bias,
        shrunk_config=shrunk_config,
    )


def _attention_bias(cfg: PretrainedConfig) -> bool:
    return bool(getattr(cfg, "attention_bias", False))


LLAMA = decoder("llama", PRESETS, LlamaConfig, LlamaForCausalLM, _attention_bias, enable_llama_bias)
MISTRAL = decoder("mistral", TINY, MistralConfig, MistralForCausalLM, lambda cfg: False)
QWEN2 = decoder("qwen2", TINY, Qwen2Config, Qwen2ForCausalLM, lambda cfg: True)
QWEN3 = decoder("qwen3", TINY, Qwen3Config, Qwen3ForCausalLM, _attention_bias)
GEMMA2 = decoder("gemma2", TINY, Gemma2Config, Gemma2ForCausalLM, _attention_bias)
GEMMA3 = decoder("gemma3_text", TINY, Gemma3TextConfig, Gemma3ForCausalLM, _attention_bias)
