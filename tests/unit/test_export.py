"""Export equivalence: a saved κ-subnet gives the logits of the masked full model with the training correction.

The oracle runs the training-time correction (a `Correction`'s install and dispatch) on the
full-width model with the dropped units zeroed; the export folds the same correction into weights and
biases of a smaller dense checkpoint.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from helpers.models import VOCAB, oracle_logits, random_model, word_tokenizer
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

from twist_scale.commands.export import main
from twist_scale.models import architecture_of
from twist_scale.pruning.build import build_subnet, layer_widths
from twist_scale.pruning.format import REMOTE_LOADER, SUBNET_FILE, load_exported, save_exported
from twist_scale.pruning.pruner import SavedCentral
from twist_scale.subnet import SubnetSampler, SubnetSpec, partitioned_blocks


@pytest.fixture
def tokenizer() -> PreTrainedTokenizerFast:
    return word_tokenizer()


def random_means(model: torch.nn.Module, groups) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    weights = {
        unit_block.output_module: (model.get_submodule(unit_block.output_module).weight, unit_block.output_input_axis)
        for unit_block in groups
    }
    return {name: torch.randn(w.shape[axis], generator=g) for name, (w, axis) in weights.items()}


def widths_of(model, spec: SubnetSpec) -> dict:
    return layer_widths(architecture_of(model).unit_blocks(model.config), spec)


CASES = [
    ("llama", [], "none"),
    ("llama", [], "scale"),
    ("llama", [], "mean"),
    ("llama", [0, 5], "mean"),
    ("llama", [0, 5], "scale"),
    ("gpt2", [], "none"),
    ("gpt2", [], "scale"),
    ("gpt2", [3], "mean"),
]


@pytest.mark.parametrize("arch,shared,correction", CASES)
def test_export_matches_masked_model_with_correction(tmp_path, tokenizer, arch, shared, correction):
    model = random_model(arch)
    groups = partitioned_blocks(architecture_of(model).unit_blocks(model.config), shared)
    spec = SubnetSampler(tuple(groups), (0.5,), seed=3).specs(0)[0]
    means = random_means(model, groups)
    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))

    sub, plain = build_subnet(model, spec, correction, means)
    path = save_exported(tmp_path / "export", sub, tokenizer, plain, {"kappa": 0.5, "widths": widths_of(model, spec)})
    loaded = load_exported(path)
    with torch.no_grad():
        got = loaded(input_ids=ids).logits
    want = oracle_logits(model, groups, spec, correction, means, ids)
    assert (got - want).abs().max().item() <= 1e-5

    # the fold must matter: without it the export would not match the corrected oracle
    if correction != "none":
        uncorrected = oracle_logits(model, groups, spec, "none", means, ids)
        assert (got - uncorrected).abs().max().item() > 1e-2
    # the model given to build_subnet is untouched (every κ comes from the same central model)
    assert (
        model.get_submodule(groups[0].output_module).weight.shape
        == random_model(arch).get_submodule(groups[0].output_module).weight.shape
    )


def llama_params(cfg, kv_units: int, neurons: int, bias: bool) -> int:
    """Parameter count of a uniform Llama subnet, from the config alone."""
    d, hd, q_per_kv = cfg.hidden_size, cfg.head_dim, cfg.num_attention_heads // cfg.num_key_value_heads
    q, kv = kv_units * q_per_kv * hd, kv_units * hd
    attn = d * q + 2 * d * kv + q * d + (q + 2 * kv + d if bias else 0)
    mlp = 3 * d * neurons + (2 * neurons + d if bias else 0)
    per_layer = attn + mlp + 2 * d  # two RMSNorms
    return cfg.num_hidden_layers * per_layer + 2 * cfg.vocab_size * d + d  # embed, untied head, final norm


def gpt2_params(cfg, heads: int, neurons: int) -> int:
    d, hd = cfg.n_embd, cfg.n_embd // cfg.n_head
    a = heads * hd
    attn = d * 3 * a + 3 * a + a * d + d
    mlp = d * neurons + neurons + neurons * d + d
    per_layer = attn + mlp + 4 * d  # two LayerNorms
    return cfg.n_layer * per_layer + cfg.vocab_size * d + cfg.n_positions * d + 2 * d  # tied head, final LN


@pytest.mark.parametrize("correction", ["none", "mean"])
@pytest.mark.parametrize("kappa", [1.0, 0.5, 0.25])
def test_parameter_counts_match_formula(kappa, correction):
    llama = random_model("llama")
    groups = architecture_of(llama).unit_blocks(llama.config)
    spec = SubnetSampler(tuple(groups), (kappa,), seed=0).specs(0)[0]
    sub, plain = build_subnet(llama, spec, correction, random_means(llama, groups))
    cfg = llama.config
    kv, neurons = math.ceil(kappa * cfg.num_key_value_heads), math.ceil(kappa * cfg.intermediate_size)
    bias = correction == "mean" and kappa < 1  # biases appear only when a shift is folded
    assert plain
    assert sum(p.numel() for p in sub.parameters()) == llama_params(cfg, kv, neurons, bias)

    gpt2 = random_model("gpt2")
    groups = architecture_of(gpt2).unit_blocks(gpt2.config)
    spec = SubnetSampler(tuple(groups), (kappa,), seed=0).specs(0)[0]
    sub, _ = build_subnet(gpt2, spec, correction, random_means(gpt2, groups))
    cfg = gpt2.config
    expected = gpt2_params(cfg, math.ceil(kappa * cfg.n_head), math.ceil(kappa * 4 * cfg.n_embd))
    assert sum(p.numel() for p in sub.parameters()) == expected


def test_uniform_llama_loads_plain_and_nonuniform_needs_load_exported(tmp_path, tokenizer):
    model = random_model("llama")
    all_groups = architecture_of(model).unit_blocks(model.config)
    ids = torch.randint(0, VOCAB, (1, 9))

    uniform = SubnetSampler(tuple(all_groups), (0.5,), seed=0).specs(0)[0]
    sub, plain = build_subnet(model, uniform, "mean", random_means(model, all_groups))
    record = {"kappa": 0.5, "widths": widths_of(model, uniform)}
    path = save_exported(tmp_path / "uniform", sub, tokenizer, plain, record)
    assert plain
    hf = AutoModelForCausalLM.from_pretrained(path).eval()
    assert hf.config.intermediate_size == 64 and hf.config.num_key_value_heads == 1 and hf.config.attention_bias
    assert AutoTokenizer.from_pretrained(path).eos_token == "<eos>"
    with torch.no_grad():
        torch.testing.assert_close(hf(input_ids=ids).logits, sub(input_ids=ids).logits, rtol=0, atol=1e-5)

    groups = partitioned_blocks(all_groups, [0, 1, 4, 5])
    spec = SubnetSampler(tuple(groups), (0.5,), seed=0).specs(0)[0]
    sub, plain = build_subnet(model, spec, "none")
    path = save_exported(tmp_path / "mixed", sub, tokenizer, plain, {"kappa": 0.5, "widths": widths_of(model, spec)})
    assert not plain
    record = json.loads((path / SUBNET_FILE).read_text())
    assert record["loader"] == REMOTE_LOADER
    assert record["widths"]["0"] == {"attn": 2, "mlp": 128} and record["widths"]["2"] == {"attn": 1, "mlp": 64}
    assert "trust_remote_code=True" in (path / "README.md").read_text()
    shapes = json.loads((path / "config.json").read_text())["twist_shapes"]
    assert shapes["model.layers.2.mlp.up_proj.weight"] == [64, 64]
    with pytest.raises(ValueError, match="trust_remote_code"):
        AutoModelForCausalLM.from_pretrained(path)
    with torch.no_grad():
        torch.testing.assert_close(load_exported(path)(input_ids=ids).logits, sub(input_ids=ids).logits)


def test_head_count_not_dividing_hidden_exports_through_load_exported(tmp_path, tokenizer):
    model = random_model("llama", "tiny-mha")  # 4 heads of 16: κ = 0.75 keeps 3, and 64 % 3 != 0
    groups = architecture_of(model).unit_blocks(model.config)
    spec = SubnetSampler(tuple(groups), (0.75,), seed=0).specs(0)[0]
    sub, plain = build_subnet(model, spec, "scale")
    assert not plain and sub.model.layers[0].self_attn.q_proj.weight.shape == (48, 64)
    path = save_exported(tmp_path / "k75", sub, tokenizer, plain, {"kappa": 0.75, "widths": widths_of(model, spec)})
    assert json.loads((path / SUBNET_FILE).read_text())["loader"] == REMOTE_LOADER
    ids = torch.randint(0, VOCAB, (1, 9))
    with torch.no_grad():
        torch.testing.assert_close(load_exported(path)(input_ids=ids).logits, sub(input_ids=ids).logits)


def test_bad_input_names_the_fix(tmp_path, capsys):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        SavedCentral.load(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="not a TwIST export"):
        load_exported(tmp_path)
    model = random_model("llama")
    spec = SubnetSpec({})
    with pytest.raises(ValueError, match="--correction"):
        build_subnet(model, spec, "halve")
    for kappa in ("0", "1.5"):
        with pytest.raises(SystemExit):
            main([str(tmp_path), "--kappa", kappa, "--out", str(tmp_path / "out")])
        assert "--kappa" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([str(tmp_path / "missing"), "--kappa", "0.5", "--out", str(tmp_path / "out")])
    assert "no config.json" in capsys.readouterr().err
