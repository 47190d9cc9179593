"""A TwIST run from a pretrained checkpoint of every supported architecture (G = 2, κ = 0.5, correction
'mean'), then its exports: final/ is a plain checkpoint of the architecture, a uniform export gives
the logits the pruner's training view gives, and an adaptive one loads through its remote code."""

from __future__ import annotations

import pytest
import torch
from helpers import tiny_args
from helpers.architectures import save_tiny_checkpoint
from helpers.dist import train_on_ranks
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from twist_scale.commands.export import main as export_main
from twist_scale.pruning.format import load_exported
from twist_scale.pruning.pruner import SavedCentral, build_pruner

MODEL_TYPES = ["llama", "mistral", "qwen2", "qwen3", "phi3", "gemma2", "gemma3_text", "gpt2"]


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_a_pretrained_checkpoint_trains_and_exports(model_type, tmp_path):
    base = save_tiny_checkpoint(model_type, tmp_path / "base", vocab_size=512)  # the runs' tokenizer's size
    out = tmp_path / "run"
    args = tiny_args(
        out,
        model__pretrained=base,
        parallel__engine="local",
        twist__groups=2,
        twist__kappa=0.5,
        twist__correction="mean",
        twist__rounds=2,
        twist__local_steps=2,
        eval__every_rounds=0,
        checkpoint__every_rounds=0,
    )
    train_on_ranks(2, args)

    final = AutoModelForCausalLM.from_pretrained(out / "final", dtype=torch.float32).eval()
    assert final.config.model_type == model_type
    before, after = load_file(base / "model.safetensors"), load_file(out / "final" / "model.safetensors")
    assert any(not torch.equal(before[n], after[n]) for n in before), "training moved no weight"

    exports = tmp_path / "exports"
    export_main(
        [str(out / "final"), "--method", "random", "--shared_layers", "none", "--kappa", "0.5", "--out", str(exports)]
    )
    export_main([str(out / "final"), "--method", "adaptive_stats", "--kappa", "0.5", "--out", str(exports)])
    ids = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(0))
    pruner = build_pruner(SavedCentral.load(out / "final"), "random", shared_layers="none")
    view, _, _ = pruner.subnet(0.5)
    uniform = load_exported(exports / "random_kappa_0.50_seed0")
    adaptive = load_exported(exports / "adaptive_stats_kappa_0.50")
    with torch.no_grad():
        torch.testing.assert_close(uniform(input_ids=ids).logits, view(input_ids=ids).logits, rtol=0, atol=1e-5)
        assert torch.isfinite(adaptive(input_ids=ids).logits).all()
