"""What a run does to its model's decoder layers before an engine wraps them: activation
checkpointing and compilation, one decoder layer at a time (the order torchtitan applies them, before
FSDP shards the same layers)."""

from __future__ import annotations

from torch import nn

from twist_scale.config import ParallelConfig


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The model's repeated blocks, found by its own `_no_split_modules` (LlamaDecoderLayer, GPT2Block,
    ...), so no architecture list is kept here."""
    layer_types = set(getattr(model, "_no_split_modules", None) or ())
    return [m for m in model.modules() if type(m).__name__ in layer_types]


def prepare_layers(model: nn.Module, cfg: ParallelConfig) -> None:
    """Activation checkpointing keeps one layer's inputs instead of all its activations and recomputes
    the rest in backward (non-reentrant: works under ZeRO-3's and FSDP2's parameter hooks). Compiling
    per layer gives one graph per layer shape; a TwIST group's subnet shapes are fixed for the run, so
    dispatch never recompiles."""
    if cfg.activation_checkpointing:
        model.config.use_cache = False  # a KV cache is meaningless in training and refused under checkpointing
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.compile:
        for layer in decoder_layers(model):
            layer.compile()
