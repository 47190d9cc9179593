"""Model presets and per-architecture unit maps.

A *unit map* says which slices of which tensors form one attention unit (a KV group with its
query heads) or one MLP neuron. Slicing, scattering and aggregation are generic over it: the
model code never learns about subnets, ranks or masks.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PretrainedConfig,
)
from transformers.pytorch_utils import Conv1D

PRESETS: dict[str, dict[str, dict]] = {
    "llama": {
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
    },
    "gpt2": {
        "tiny": dict(n_embd=64, n_layer=4, n_head=4, n_positions=512),
        "small": dict(n_embd=384, n_layer=6, n_head=6, n_positions=1024),
    },
}


def build_model(arch: str, size: str, vocab_size: int, pretrained: str = "") -> nn.Module:
    """A full-width model from a preset (seeded by the caller) or a from_pretrained directory/hub id."""
    if pretrained:
        model = AutoModelForCausalLM.from_pretrained(pretrained, dtype=torch.float32)
        if model.config.vocab_size < vocab_size:
            raise ValueError(
                f"tokenizer has {vocab_size} tokens but the pretrained model only {model.config.vocab_size}; "
                "use the model's own tokenizer (--data.tokenizer) or a matching checkpoint"
            )
        return model
    if size not in PRESETS[arch]:
        raise ValueError(f"--model.size {size!r} is not a {arch} preset; choose one of {', '.join(PRESETS[arch])}")
    if arch == "llama":
        config = LlamaConfig(vocab_size=vocab_size, tie_word_embeddings=False, **PRESETS[arch][size])
        return LlamaForCausalLM(config)
    config = GPT2Config(vocab_size=vocab_size, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **PRESETS[arch][size])
    return GPT2LMHeadModel(config)


@dataclass(frozen=True)
class AxisSlice:
    """Along `axis` of tensor `name`, unit u owns `width` contiguous elements at u*width in each segment."""

    name: str
    axis: int
    width: int
    segments: int = 1
    segment_stride: int = 0

    def index(self, units: torch.Tensor) -> torch.Tensor:
        base = (units[:, None] * self.width + torch.arange(self.width)).flatten()
        return torch.cat([base + s * self.segment_stride for s in range(self.segments)])


@dataclass(frozen=True)
class UnitGroup:
    """The units of one kind ('attn' or 'mlp') in one layer, and the tensor slices they own."""

    layer: int
    kind: str
    num_units: int
    axes: tuple[AxisSlice, ...]
    output_module: str  # its output is the block's residual contribution (o_proj / down_proj / c_proj)
    output_input_axis: int  # the axis of output_module.weight indexed by unit channels

    @property
    def key(self) -> tuple[int, str]:
        return self.layer, self.kind

    @property
    def output_axis(self) -> AxisSlice:
        return next(a for a in self.axes if a.name == f"{self.output_module}.weight")


@dataclass(frozen=True)
class Architecture:
    unit_groups: Callable[[PretrainedConfig], list[UnitGroup]]
    fix_module_attrs: Callable[[nn.Module, PretrainedConfig], None]
    num_layers: Callable[[PretrainedConfig], int]


def _llama_units(cfg: PretrainedConfig) -> list[UnitGroup]:
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
        groups.append(UnitGroup(i, "attn", cfg.num_key_value_heads, tuple(attn), f"{a}.o_proj", 1))
        groups.append(UnitGroup(i, "mlp", cfg.intermediate_size, tuple(mlp), f"{m}.down_proj", 1))
    return groups


def _gpt2_units(cfg: PretrainedConfig) -> list[UnitGroup]:
    e, head_dim = cfg.n_embd, cfg.n_embd // cfg.n_head
    inner = cfg.n_inner or 4 * e
    groups = []
    for i in range(cfg.n_layer):
        a, m = f"transformer.h.{i}.attn", f"transformer.h.{i}.mlp"
        # c_attn is a fused Conv1D (in, 3E): the q, k and v columns of head h sit in three segments.
        attn = (
            AxisSlice(f"{a}.c_attn.weight", 1, head_dim, 3, e),
            AxisSlice(f"{a}.c_attn.bias", 0, head_dim, 3, e),
            AxisSlice(f"{a}.c_proj.weight", 0, head_dim),
        )
        mlp = (
            AxisSlice(f"{m}.c_fc.weight", 1, 1),
            AxisSlice(f"{m}.c_fc.bias", 0, 1),
            AxisSlice(f"{m}.c_proj.weight", 0, 1),
        )
        groups.append(UnitGroup(i, "attn", cfg.n_head, attn, f"{a}.c_proj", 0))
        groups.append(UnitGroup(i, "mlp", inner, mlp, f"{m}.c_proj", 0))
    return groups


def _fix_linear_and_conv(model: nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, nn.Linear):
            module.out_features, module.in_features = module.weight.shape
        elif isinstance(module, Conv1D):
            module.nx, module.nf = module.weight.shape


def _fix_llama(model: nn.Module, cfg: PretrainedConfig) -> None:
    _fix_linear_and_conv(model)  # attention reshapes with -1 heads, so widths are all it needs


def _fix_gpt2(model: nn.Module, cfg: PretrainedConfig) -> None:
    _fix_linear_and_conv(model)
    head_dim = cfg.n_embd // cfg.n_head
    for block in model.transformer.h:
        block.attn.split_size = block.attn.c_attn.nf // 3
        block.attn.num_heads = block.attn.split_size // head_dim


ARCHITECTURES: dict[str, Architecture] = {
    "llama": Architecture(_llama_units, _fix_llama, lambda c: c.num_hidden_layers),
    "gpt2": Architecture(_gpt2_units, _fix_gpt2, lambda c: c.n_layer),
}


def architecture_of(model: nn.Module) -> Architecture:
    kind = model.config.model_type
    if kind not in ARCHITECTURES:
        raise ValueError(f"model type {kind!r} has no unit map; supported: {', '.join(ARCHITECTURES)}")
    return ARCHITECTURES[kind]


def units_to_keep(num_units: int, kappa: float) -> int:
    """ceil(kappa * n), robust to float noise (0.3 * 10 must give 3, not 4)."""
    return max(1, math.ceil(round(kappa * num_units, 9)))
