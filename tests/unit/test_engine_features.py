"""Attention kernel choice, compiled layers and the one combination of accumulation the trainer
refuses (accumulation and activation checkpointing under DeepSpeed and FSDP2: dist/test_accumulation.py)."""

from __future__ import annotations

import functools
import importlib.util

import pytest
import torch

from twist_scale.config import ConfigError, RunConfig
from twist_scale.config_validate import validate
from twist_scale.engines import build_engine
from twist_scale.engines.layers import decoder_layers
from twist_scale.models import build_model
from twist_scale.run_model import use_attention


def tiny(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model("llama", "tiny", 64).eval()


def test_attention_kernels_give_the_same_logits():
    batch = torch.randint(0, 64, (2, 32), generator=torch.Generator().manual_seed(1))
    logits = {}
    for kernel in ("sdpa", "eager"):
        model = tiny()
        use_attention(model, kernel)
        assert model.config._attn_implementation == kernel
        logits[kernel] = model(input_ids=batch).logits
    assert torch.allclose(logits["sdpa"], logits["eager"], atol=1e-5)


@pytest.mark.skipif(importlib.util.find_spec("flash_attn") is not None, reason="flash-attn is installed")
def test_a_kernel_that_is_not_installed_is_one_line():
    with pytest.raises(ConfigError, match="flash_attention_2.*Use sdpa or eager") as err:
        use_attention(tiny(), "flash_attention_2")
    assert "\n" not in str(err.value)


@pytest.mark.slow  # 7 s: torch.compile's first compilation
def test_compiled_layers_train_like_eager_ones(monkeypatch):
    """Every decoder layer compiled; the same losses as eager over steps that change the weights.

    Compiled with dynamo and AOT autograd but no code generation (`aot_eager`): the graphs, guards and
    backward this run takes, without ~40 s of C++ compilation per cold cache (inductor's own numerics
    are torch's to test)."""
    monkeypatch.setattr(
        torch.nn.Module, "compile", functools.partialmethod(torch.nn.Module.compile, backend="aot_eager")
    )
    batches = [torch.randint(0, 64, (2, 32), generator=torch.Generator().manual_seed(i)) for i in range(3)]
    losses = {}
    for compiled in (False, True):
        cfg = RunConfig()
        cfg.parallel.engine, cfg.parallel.compile, cfg.optim.warmup_steps = "local", compiled, 0
        engine = build_engine(tiny(), cfg, topo=None)
        layers = decoder_layers(engine.module)
        assert len(layers) == 6 and all((layer._compiled_call_impl is not None) == compiled for layer in layers)
        losses[compiled] = [engine.train_step([b]) for b in batches]
    assert losses[True] == pytest.approx(losses[False], rel=1e-5)


def test_skipping_nonfinite_steps_needs_unaccumulated_steps(tmp_path):
    cfg = RunConfig()
    cfg.data.train_files = [str(tmp_path / "text.txt")]
    (tmp_path / "text.txt").write_text("some text\n")
    cfg.on_nonfinite, cfg.optim.grad_accum_steps = "skip", 2
    with pytest.raises(ConfigError, match="--on_nonfinite skip with --optim.grad_accum_steps"):
        validate(cfg)
    cfg.on_nonfinite = "stop"
    validate(cfg)
