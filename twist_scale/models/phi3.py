"""Phi-3: a Llama-shaped decoder whose q/k/v rows are fused in `qkv_proj` and gate/up rows in `gate_up_proj`.

An attention unit is a KV group with its query heads, as for Llama: in `qkv_proj` it owns its query
rows in the first segment and one head's rows in each of the key and value segments (unequal
widths), and slicing keeps the segments in order, so the sliced tensor is still [q | k | v]. An MLP
neuron owns one row in each half of `gate_up_proj`.
"""

from __future__ import annotations

from torch import nn
from transformers import Phi3Config, Phi3ForCausalLM, PretrainedConfig

from twist_scale.models.base import Architecture, AxisSlice, UnitBlock
from twist_scale.models.llama import TINY, enable_output_bias, shrunk_config


def from_preset(preset: dict, vocab_size: int) -> nn.Module:
    return Phi3ForCausalLM(Phi3Config(vocab_size=vocab_size, tie_word_embeddings=False, **preset))


def unit_blocks(cfg: PretrainedConfig) -> list[UnitBlock]:
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    heads, kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
    q_width = heads // kv_heads * head_dim
    qkv = ((0, q_width), (heads * head_dim, head_dim), ((heads + kv_heads) * head_dim, head_dim))
    groups = []
    for i in range(cfg.num_hidden_layers):
        a, m = f"model.layers.{i}.self_attn", f"model.layers.{i}.mlp"
        attn = (AxisSlice(f"{a}.qkv_proj.weight", 0, segments=qkv), AxisSlice(f"{a}.o_proj.weight", 1, q_width))
        gate_up = ((0, 1), (cfg.intermediate_size, 1))
        mlp = (AxisSlice(f"{m}.gate_up_proj.weight", 0, segments=gate_up), AxisSlice(f"{m}.down_proj.weight", 1, 1))
        groups.append(UnitBlock(i, "attn", kv_heads, attn, f"{a}.o_proj", 1))
        groups.append(UnitBlock(i, "mlp", cfg.intermediate_size, mlp, f"{m}.down_proj", 1))
    return groups


PHI3 = Architecture(
    model_type="phi3",
    presets=TINY,
    from_preset=from_preset,
    unit_blocks=unit_blocks,
    num_layers=lambda cfg: cfg.num_hidden_layers,
    enable_bias=enable_output_bias,  # its config states no bias: the export loads through remote code
    shrunk_config=shrunk_config,
)
