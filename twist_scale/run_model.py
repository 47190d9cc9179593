"""The full-width model a run trains, and the unit map its subnets are cut from."""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig

from twist_scale.config import ConfigError, RunConfig
from twist_scale.correction import Correction, correction_of
from twist_scale.models import UnitBlock, architecture_for, architecture_of, build_model
from twist_scale.subnet import default_shared_layers, partitioned_blocks
from twist_scale.tokenizer import has_tokenizer, load_tokenizer, sample_text, tokenizer_directory


@dataclass(frozen=True)
class RunModel:
    model: nn.Module  # full width on the meta device, the correction installed (startup.fill fills it)
    unit_blocks: list[UnitBlock]  # what subnets slice: partitioned unit blocks and the correction's statistics
    shared_layers: list[int]  # kept whole in every subnet
    correction: Correction  # the run's activation-shift correction, installed in `model`

    @property
    def parameters(self) -> int:
        return parameter_count(self.model)


def parameter_count(model: nn.Module) -> int:
    """Parameters of `model` whatever its engine did to them: ZeRO-3 leaves each an empty tensor and
    keeps the true size in `ds_numel`; an FSDP2 DTensor's `numel` is already the whole tensor's."""
    return sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())


def full_model_builder(cfg: RunConfig, vocab_size: int) -> Callable[[], nn.Module]:
    """Builds the run's full-width architecture, for values loaded into it afterwards (export)."""
    return functools.partial(build_model, cfg.model.arch, cfg.model.size, vocab_size, cfg.model.pretrained, False)


def check_pretrained(cfg: RunConfig) -> None:
    """A checkpoint the run can start from, checked before any process group, file or data work: it
    exists, its architecture is supported and its vocabulary covers the run's tokenizer."""
    pretrained = cfg.model.pretrained
    if not pretrained:
        return
    hub_id = pretrained.count("/") == 1 and not pretrained.startswith((".", "/", "~"))
    if not Path(pretrained).is_dir() and not hub_id:
        raise ConfigError(f"--model.pretrained {pretrained}: no such directory; give a save_pretrained directory")
    try:
        config = AutoConfig.from_pretrained(pretrained)
    except (OSError, ValueError) as err:
        reason = str(err).splitlines()[0]
        raise ConfigError(f"--model.pretrained {pretrained}: no model config there ({reason})") from None
    architecture_for(config.model_type)
    tokenizer = tokenizer_directory(cfg)
    if has_tokenizer(tokenizer):
        vocab, source = len(load_tokenizer(tokenizer, sample_text(cfg.data))), f"the tokenizer in {tokenizer}"
    else:
        vocab, source = cfg.data.vocab_size, "--data.vocab_size (the tokenizer this run trains)"
    if vocab > config.vocab_size:
        raise ConfigError(
            f"{source} has {vocab} tokens but --model.pretrained {pretrained} only {config.vocab_size}; use the "
            "checkpoint's own tokenizer (leave --data.tokenizer empty) or a matching checkpoint"
        )


def use_attention(model: nn.Module, kernel: str) -> None:
    """Train with attention kernel `kernel` ('auto': the model's own choice); one that is not installed, or
    that the architecture lacks, is a config error, not a traceback."""
    if kernel == "auto":
        return
    try:
        model.set_attn_implementation(kernel)
    except (ImportError, ValueError) as err:
        reason = str(err).splitlines()[0]
        raise ConfigError(f"--model.attn_implementation {kernel}: {reason} Use sdpa or eager.") from None


def build_run_model(cfg: RunConfig, vocab_size: int) -> RunModel:
    with torch.device("meta"):  # no values yet: the engine and sync fill what this rank keeps
        model = full_model_builder(cfg, vocab_size)()
    use_attention(model, cfg.model.attn_implementation)
    arch = architecture_of(model)
    layers = arch.num_layers(model.config)
    shared = default_shared_layers(layers) if cfg.twist.shared_layers is None else cfg.twist.shared_layers
    if any(not 0 <= i < layers for i in shared):
        raise ConfigError(f"--twist.shared_layers {shared}: the model has layers 0..{layers - 1}")
    correction = correction_of(cfg.twist.correction)
    unit_blocks = correction.unit_blocks(partitioned_blocks(arch.unit_blocks(model.config), shared))
    correction.install(model, unit_blocks, cfg.twist.stat_momentum)
    return RunModel(model, unit_blocks, sorted(shared), correction)
