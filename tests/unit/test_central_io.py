"""The central model's export streams into save_pretrained's layout, one shard at a time."""

from __future__ import annotations

import functools

import pytest
import torch
from helpers.models import VOCAB, word_tokenizer
from transformers import AutoModelForCausalLM

from twist_scale.central_io import export_central
from twist_scale.models import build_model


@pytest.mark.parametrize(("arch", "shard_bytes"), [("llama", 150_000), ("gpt2", 2**30)])  # several shards; one
def test_streamed_export_loads_with_from_pretrained(tmp_path, arch, shard_bytes):
    torch.manual_seed(0)
    trained = build_model(arch, "tiny", VOCAB)
    stats = {"model.x.twist_act_mean": torch.arange(3.0)}
    state = [*stats.items(), *((n, p.detach()) for n, p in trained.named_parameters())]
    build = functools.partial(build_model, arch, "tiny", VOCAB)
    export_central(tmp_path / "final", iter(state), build, word_tokenizer(), {"kappa": 0.5}, True, shard_bytes)

    shards = sorted((tmp_path / "final").glob("model*.safetensors"))
    largest = max(p.numel() * 4 for p in trained.parameters())
    total = sum(p.numel() * 4 for p in trained.parameters())
    assert len(shards) >= total // shard_bytes + 1 and all(s.stat().st_size <= shard_bytes + largest for s in shards)
    assert (tmp_path / "final" / "model.safetensors.index.json").is_file() == (len(shards) > 1)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "final").eval()
    for (name, value), (_, got) in zip(trained.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert torch.equal(got, value), name
    ids = torch.randint(0, VOCAB, (1, 12))
    assert torch.equal(loaded(ids).logits, trained.eval()(ids).logits)
    assert (tmp_path / "final" / "twist_stats.safetensors").is_file()


def test_a_central_model_that_does_not_fit_leaves_no_export(tmp_path):
    trained = build_model("llama", "tiny", VOCAB)
    state = [(n, p.detach()) for n, p in trained.named_parameters() if "layers.5." not in n]
    build = functools.partial(build_model, "llama", "tiny", VOCAB)
    with pytest.raises(RuntimeError, match=r"missing \['model\.layers\.5\."):
        export_central(tmp_path / "final", iter(state), build, word_tokenizer(), {}, True)
    assert not (tmp_path / "final").exists()
