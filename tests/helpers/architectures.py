"""Tiny random checkpoints of every supported architecture, built with transformers' own config classes."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    Gemma2Config,
    Gemma3TextConfig,
    GPT2Config,
    LlamaConfig,
    MistralConfig,
    Phi3Config,
    PretrainedConfig,
    Qwen2Config,
    Qwen3Config,
)

# GQA everywhere (2 query heads per KV group); 4 layers, so shared layers and per-layer widths differ.
DECODER = dict(
    hidden_size=64,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=96,
    head_dim=16,
    max_position_embeddings=128,
    tie_word_embeddings=False,
)
LLAMA3_ROPE = dict(
    rope_type="llama3",
    rope_theta=500000.0,
    factor=8.0,
    low_freq_factor=1.0,
    high_freq_factor=4.0,
    original_max_position_embeddings=16,
)
ALTERNATING = ["sliding_attention", "full_attention"] * 2


def tiny_config(model_type: str, vocab_size: int) -> PretrainedConfig:
    """A config of each architecture with its distinctive features switched on at a tiny size."""
    configs = {
        "llama": lambda: LlamaConfig(**DECODER, rope_parameters=LLAMA3_ROPE),
        "mistral": lambda: MistralConfig(**DECODER, sliding_window=4),
        "qwen2": lambda: Qwen2Config(**DECODER),  # q/k/v biases always
        "qwen3": lambda: Qwen3Config(**DECODER),  # q/k norms over head_dim
        "phi3": lambda: Phi3Config(**DECODER, pad_token_id=0),  # fused qkv_proj and gate_up_proj
        "gemma2": lambda: Gemma2Config(
            **DECODER | {"tie_word_embeddings": True},
            sliding_window=4,
            layer_types=ALTERNATING,
            attn_logit_softcapping=20.0,
            final_logit_softcapping=10.0,
            query_pre_attn_scalar=16,
        ),
        "gemma3_text": lambda: Gemma3TextConfig(
            **DECODER | {"tie_word_embeddings": True}, sliding_window=4, layer_types=ALTERNATING
        ),
        "gpt2": lambda: GPT2Config(n_embd=64, n_layer=4, n_head=4, n_positions=128),
    }
    config = configs[model_type]()
    config.vocab_size = vocab_size
    return config


def tiny_checkpoint(model_type: str, vocab_size: int, seed: int = 0) -> torch.nn.Module:
    """Random weights large enough (every tensor, biases and norms included) that a wrong slice shows."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(model_type, vocab_size), dtype=torch.float32).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.15)
    return model


def save_tiny_checkpoint(model_type: str, directory: Path, vocab_size: int, seed: int = 0) -> Path:
    tiny_checkpoint(model_type, vocab_size, seed).save_pretrained(directory)
    return directory
