"""Pruning methods: one signature, the right units, and every one exports a loadable subnet."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers.models import VOCAB, oracle_logits, random_model, word_tokenizer

from twist_scale.models import architecture_of, units_to_keep
from twist_scale.pruning import load_exported
from twist_scale.pruning.build import build_subnet
from twist_scale.pruning.calibration import (
    ActivationStats,
    calibration_batches,
    collect_activation_stats,
    collect_gradients,
    mean_token_nll,
)
from twist_scale.pruning.methods import METHODS, method
from twist_scale.pruning.pruner import SavedCentral, build_pruner, export_subnet
from twist_scale.pruning.selectors import BEST_OF, PruneInputs
from twist_scale.subnet import partitioned_blocks


def calibration(seed: int = 0) -> list[torch.Tensor]:
    stream = torch.randint(0, VOCAB, (400,), generator=torch.Generator().manual_seed(seed))
    return calibration_batches(stream, samples=6, seqlen=16, batch_size=4, seed=seed)


def central(model: torch.nn.Module, meta: dict | None = None) -> SavedCentral:
    """A central model in memory, as SavedCentral.load would give for a dense run with no shared layers."""
    return SavedCentral(
        Path("in-memory"), model, word_tokenizer(), {}, meta or {"shared_layers": [], "correction": "none"}
    )


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_method_exports_a_loadable_subnet(tmp_path, arch, name):
    model = random_model(arch)
    source = central(model)
    if METHODS[name].needs_training_stats:  # what a correction 'mean' run leaves in its central model
        groups = partitioned_blocks(architecture_of(model).unit_blocks(model.config), [])
        stats = collect_activation_stats(model, groups, calibration(seed=1))
        meta = {"shared_layers": [], "correction": "mean"}
        source = SavedCentral(Path("in-memory"), model, word_tokenizer(), stats.mean, meta, training_stats=stats)
    pruner = build_pruner(source, name, calibration=calibration())
    spec = pruner.spec(0.5, seed=1)
    for unit_block in pruner.unit_blocks:
        kept = spec.ids()[unit_block.key]
        assert len(kept) == len(set(kept))
        if METHODS[name].adaptive:  # per-layer widths (test_faithfulness checks their total)
            assert 1 <= len(kept) <= unit_block.num_units
        else:
            assert len(kept) == units_to_keep(unit_block.num_units, 0.5)
        assert all(0 <= u < unit_block.num_units for u in kept)
    path = export_subnet(pruner, tmp_path, 0.5, seed=1)
    loaded = load_exported(path)
    sub, _, _ = pruner.subnet(0.5, seed=1)
    ids = torch.randint(0, VOCAB, (2, 10))
    with torch.no_grad():
        got = loaded(input_ids=ids).logits
        torch.testing.assert_close(got, sub(input_ids=ids).logits, rtol=0, atol=1e-5)
    assert torch.isfinite(got).all()
    assert sum(p.numel() for p in loaded.parameters()) < sum(p.numel() for p in model.parameters())


def test_random_is_seeded_and_magnitude_ignores_seed():
    model = random_model("llama")
    groups = architecture_of(model).unit_blocks(model.config)
    draw = lambda name, seed: METHODS[name].select(PruneInputs(model, groups, 0.5, seed))  # noqa: E731
    assert draw("random", 0) == draw("random", 0)
    assert draw("random", 0) != draw("random", 1)
    assert draw("magnitude", 0) == draw("magnitude", 7)
    assert METHODS["random"].seeded and not METHODS["magnitude"].seeded


def test_random_best_exports_the_draw_with_the_lowest_calibration_loss():
    """The oracle: build every candidate draw as the export would (correction folded), score it on the
    calibration batches, keep the lowest; seed s owns random's seeds 8s..8s+7."""
    model = random_model("llama")
    batches = calibration()
    pruner = build_pruner(
        central(model, {"shared_layers": [], "correction": "scale"}), "random_best", calibration=batches
    )
    draws = build_pruner(central(model, {"shared_layers": [], "correction": "scale"}), "random")
    for seed in (0, 1):
        candidates = [draws.spec(0.5, s) for s in range(BEST_OF * seed, BEST_OF * (seed + 1))]
        losses = [mean_token_nll(build_subnet(model, c, "scale")[0], batches) for c in candidates]
        assert len(set(losses)) == BEST_OF  # distinct draws: the pick is not a tie
        assert pruner.spec(0.5, seed) == candidates[losses.index(min(losses))]
    assert pruner.spec(0.5, 0) != pruner.spec(0.5, 1)
    with pytest.raises(ValueError, match="needs calibration text"):
        build_pruner(central(model), "random_best")


def test_magnitude_keeps_the_largest_units():
    model = random_model("llama")
    mlp = model.model.layers[2].mlp
    strong = [3, 40, 77, 100]
    with torch.no_grad():
        for p in (mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight.T):
            p.mul_(0.1)
            p[strong] *= 100.0
        model.model.layers[2].self_attn.o_proj.weight[:, 32:].mul_(10.0)  # KV group 1 owns o columns 32..63
    groups = architecture_of(model).unit_blocks(model.config)
    spec = METHODS["magnitude"].select(PruneInputs(model, groups, 4 / 128, 0))
    assert spec.ids()[(2, "mlp")] == tuple(strong)
    assert spec.ids()[(2, "attn")] == (1,)


def stats_for(model, groups, var: dict[str, torch.Tensor], mean: dict[str, torch.Tensor]) -> ActivationStats:
    return ActivationStats(mean, {k: var[k] + mean[k] ** 2 for k in var}, tokens=1)


def test_flap_follows_activation_variance():
    """Equal weights: FLAP follows the channel variance; a large but constant channel it compensates with a bias."""
    model = random_model("gpt2")
    groups = architecture_of(model).unit_blocks(model.config)
    with torch.no_grad():
        for unit_block in groups:
            model.get_submodule(unit_block.output_module).weight.fill_(0.1)
    var, mean = {}, {}
    for unit_block in groups:
        n = model.get_submodule(unit_block.output_module).weight.shape[0]  # Conv1D: (unit channels, out)
        var[unit_block.output_module] = torch.full((n,), 0.01)
        mean[unit_block.output_module] = torch.zeros(n)
    mlp = "transformer.h.1.mlp.c_proj"
    var[mlp][[9, 200]] = 5.0  # high fluctuation
    mean[mlp][[50, 60]] = 30.0  # large but constant
    stats = stats_for(model, groups, var, mean)
    flap = METHODS["flap"].select(PruneInputs(model, groups, 2 / 256, 0, stats))
    assert flap.ids()[(1, "mlp")] == (9, 200)
    assert METHODS["flap_uniform"].select(PruneInputs(model, groups, 2 / 256, 0, stats)).ids()[(1, "mlp")] == (9, 200)
    with pytest.raises(ValueError, match="calibration"):
        METHODS["flap"].select(PruneInputs(model, groups, 0.5, 0))


def test_wanda_sp_keeps_large_constant_channels_that_flap_drops():
    """Two GPT-2 neurons whose input weights are zero and bias large: a large constant activation.
    Wanda-sp (‖X‖) keeps them; FLAP (Var X = 0, here its uniform variant) drops them: its bias keeps their mean."""
    model = random_model("gpt2")
    fc = model.transformer.h[1].mlp.c_fc  # Conv1D: weight (hidden, neurons)
    with torch.no_grad():
        fc.weight[:, [50, 60]] = 0.0
        fc.bias[[50, 60]] = 30.0
    batches = calibration()
    kept = lambda name: build_pruner(central(model), name, calibration=batches).spec(2 / 256).ids()[(1, "mlp")]
    assert kept("wanda_sp") == (50, 60)
    assert not {50, 60} & set(kept("flap_uniform"))
    with pytest.raises(ValueError, match="calibration"):
        METHODS["wanda_sp"].select(PruneInputs(model, architecture_of(model).unit_blocks(model.config), 0.5, 0))


def test_gradients_leave_the_model_as_it_was():
    """The gradient pass writes no .grad, restores requires_grad and train mode, changes no weight."""
    model = random_model("llama").train()
    groups = partitioned_blocks(architecture_of(model).unit_blocks(model.config), [0, 5])
    frozen = "model.layers.2.mlp.up_proj.weight"
    model.get_parameter(frozen).requires_grad_(False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    grads = collect_gradients(model, groups, calibration())
    assert model.training and not model.get_parameter(frozen).requires_grad
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert set(grads) == {a.name for unit_block in groups for a in unit_block.axes}  # layers 0 and 5 are not scored
    assert grads[frozen].abs().sum() > 0
    with pytest.raises(ValueError, match="calibration"):
        METHODS["taylor"].select(PruneInputs(model, groups, 0.5, 0))


def test_flap_folds_bias_compensation_from_calibration_means():
    """FLAP's export = the masked model + W_dropped · E_calib[a_dropped], whatever the training correction."""
    model = random_model("llama")
    batches = calibration()
    pruner = build_pruner(central(model, {"shared_layers": [0, 5], "correction": "scale"}), "flap", calibration=batches)
    assert METHODS["flap"].correction == "mean" and pruner.correction == "mean"
    groups = partitioned_blocks(architecture_of(model).unit_blocks(model.config), [0, 5])
    stats = collect_activation_stats(model, groups, batches)
    sub, plain, spec = pruner.subnet(0.5)
    assert not plain  # layers 0 and 5 kept whole
    ids = torch.randint(0, VOCAB, (2, 10))
    with torch.no_grad():
        got = sub(input_ids=ids).logits
    torch.testing.assert_close(got, oracle_logits(model, groups, spec, "mean", stats.mean, ids), rtol=0, atol=1e-5)
    other = {k: torch.zeros_like(v) for k, v in stats.mean.items()}
    assert (got - oracle_logits(model, groups, spec, "mean", other, ids)).abs().max() > 1e-2
    # the training correction is what other methods fold
    assert build_pruner(central(model, {"correction": "scale"}), "magnitude").correction == "scale"


def test_activation_stats_are_token_means_at_the_output_projection():
    model = random_model("llama")
    groups = architecture_of(model).unit_blocks(model.config)
    batches = calibration()
    stats = collect_activation_stats(model, groups, batches)
    assert not model.model.layers[3].mlp.down_proj._forward_pre_hooks  # its hooks are removed
    seen = []
    handle = model.model.layers[3].mlp.down_proj.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach()))
    with torch.no_grad():
        for b in batches:
            model(input_ids=b)
    handle.remove()
    x = torch.cat([s.reshape(-1, s.shape[-1]) for s in seen])
    assert stats.tokens == x.shape[0] == 6 * 16
    torch.testing.assert_close(stats.mean["model.layers.3.mlp.down_proj"], x.mean(0))
    torch.testing.assert_close(stats.sq_mean["model.layers.3.mlp.down_proj"], (x**2).mean(0))


def test_unknown_method_and_missing_calibration_name_the_flag():
    with pytest.raises(ValueError, match="--method"):
        method("sparsegpt")
    with pytest.raises(ValueError, match="--calibration"):
        build_pruner(central(random_model("llama")), "flap")
    with pytest.raises(ValueError, match="--kappa"):
        build_pruner(central(random_model("llama")), "random").spec(0.0)
