"""What the pruning faithfulness tests share: a tiny Llama, calibration batches, a pruner over it, and the
output projections' inputs recorded with plain hooks (no twist_scale code on the reference side)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from helpers.models import word_tokenizer
from twist_scale.models import build_model
from twist_scale.pruning.calibration import calibration_batches
from twist_scale.pruning.pruner import Pruner, SavedCentral, build_pruner

VOCAB = 97


def tiny_llama() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model("llama", "tiny", VOCAB).eval()


def calibration(vocab: int = VOCAB) -> list[torch.Tensor]:
    stream = torch.randint(0, vocab, (2000,), generator=torch.Generator().manual_seed(1))
    return calibration_batches(stream, samples=16, seqlen=32, batch_size=8, seed=0)


def pruner(model: torch.nn.Module, name: str, shared: list[int], batches: list[torch.Tensor]) -> Pruner:
    meta = {"shared_layers": shared, "correction": "none"}
    return build_pruner(SavedCentral(Path("in-memory"), model, word_tokenizer(), {}, meta), name, calibration=batches)


@torch.no_grad()
def projection_inputs(model: torch.nn.Module, layers: list[int], batches: list[torch.Tensor]) -> dict:
    """Every calibration token's input to o_proj and down_proj of the given layers, in float64."""
    seen: dict[tuple[int, str], list[torch.Tensor]] = {}

    def record(key: tuple[int, str]) -> Callable:
        return lambda module, args: seen.setdefault(key, []).append(args[0].reshape(-1, args[0].shape[-1]))

    handles = []
    for i in layers:
        block = model.model.layers[i]
        handles.append(block.self_attn.o_proj.register_forward_pre_hook(record((i, "attn"))))
        handles.append(block.mlp.down_proj.register_forward_pre_hook(record((i, "mlp"))))
    for batch in batches:
        model(input_ids=batch)
    for h in handles:
        h.remove()
    return {key: torch.cat(xs).double() for key, xs in seen.items()}


def kv_groups(model: torch.nn.Module) -> tuple[int, int, int]:
    """(KV groups, query heads per group, head_dim): a unit here is one KV group with its query heads."""
    cfg = model.config
    return cfg.num_key_value_heads, cfg.num_attention_heads // cfg.num_key_value_heads, cfg.head_dim
