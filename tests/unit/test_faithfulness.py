"""`flap` and the adaptive methods against their reference formulas, recomputed here with plain torch.

Each reference below reads the model's weights, its own hooks' activations or its own autograd
gradients; it shares no code with twist_scale.pruning, so a drift in the metric, the statistics, the
per-unit reduction, the order of the passes, the budget or the cut shows up as a different kept set.
FLAP follows the paper's formulas (AL-AM). The uniform methods: test_faithfulness_uniform.py.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from helpers.models import random_model, word_tokenizer
from helpers.pruning import calibration, kv_groups, projection_inputs, pruner, tiny_llama

from twist_scale.pruning.build import build_subnet, parameter_count
from twist_scale.pruning.calibration import ActivationStats
from twist_scale.pruning.pruner import SavedCentral, build_pruner


def flap_reference(
    model: torch.nn.Module, layers: list[int], batches: list[torch.Tensor], kappa: float
) -> tuple[dict, dict]:
    """FLAP AL-AM on Llama (GQA: a unit is one KV group with its query heads), from the paper's formulas.

    WIFV_j = Var(X_j) · Σ_i W_ij² at o_proj / down_proj (the reference code squares it for attention);
    standardised per layer and kind; a unit's score is the mean over its channels; units are cut
    globally where the kept parameter count is nearest Σ ⌈κ·n⌉ · (parameters of one unit), the unit
    at that count included (the reference code's strict `>` drops it: see docs/pruning.md).
    Returns the kept unit ids and the unit scores per (layer, kind).
    """
    cfg = model.config
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    q_per_kv = cfg.num_attention_heads // cfg.num_key_value_heads
    params = unit_params(model)
    inputs = projection_inputs(model, layers, batches)
    by_group = {}
    for kind in ("attn", "mlp"):
        for i in layers:
            block = model.model.layers[i]
            w = (block.self_attn.o_proj if kind == "attn" else block.mlp.down_proj).weight.double()
            wifv = inputs[i, kind].var(0) * w.pow(2).sum(0)
            metric = wifv**2 if kind == "attn" else wifv
            z = (metric - metric.mean()) / metric.std()
            by_group[i, kind] = z.reshape(-1, q_per_kv * head_dim).mean(1) if kind == "attn" else z
    return global_cut(by_group, params, kappa), by_group


def global_cut(by_group: dict[tuple[int, str], torch.Tensor], params: dict[str, int], kappa: float) -> dict:
    """AL-AM's cut: all units ranked by score (attention groups first, then MLP, layer by layer), the
    ranking's prefix kept whose parameter count is nearest Σ ⌈κ·n⌉ · (parameters of one unit)."""
    scores, weights, owners = [], [], []
    for kind in ("attn", "mlp"):
        for (i, k), unit in by_group.items():
            if k == kind:
                scores.append(unit)
                weights.append(torch.full_like(unit, params[kind]))
                owners += [(i, kind, u) for u in range(unit.numel())]
    budget = sum(math.ceil(kappa * unit.numel()) * params[kind] for (_, kind), unit in by_group.items())
    order = torch.argsort(torch.cat(scores), descending=True)
    cut = int(torch.argmin((torch.cat(weights)[order].cumsum(0) - budget).abs()))
    kept: dict[tuple[int, str], list[int]] = {key: [] for key in by_group}
    for idx in order[: cut + 1].tolist():
        i, kind, u = owners[idx]
        kept[i, kind].append(u)
    return {key: tuple(sorted(ids)) for key, ids in kept.items()}


def unit_params(model: torch.nn.Module) -> dict[str, int]:
    """Parameters of one Llama unit: a KV group (q and o: its query heads; k and v: one head) or a neuron."""
    cfg = model.config
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    q_per_kv = cfg.num_attention_heads // cfg.num_key_value_heads
    return {"attn": cfg.hidden_size * head_dim * (2 * q_per_kv + 2), "mlp": 3 * cfg.hidden_size}


@pytest.mark.parametrize(("shared", "kappa"), [([], 0.5), ([0, 5], 0.5), ([0, 5], 0.75)])
def test_flap_keeps_exactly_the_units_of_the_reference_formulas(shared, kappa):
    model, batches = tiny_llama(), calibration()
    layers = [i for i in range(model.config.num_hidden_layers) if i not in shared]
    expected, _ = flap_reference(model, layers, batches, kappa)
    assert all(expected.values()), "the reference leaves a group empty: pick a κ where the guard stays out"
    assert pruner(model, "flap", shared, batches).spec(kappa).ids() == expected


def test_adaptive_stats_is_flaps_ranking_on_the_statistics_training_kept():
    """Zero-cost AL-AM: given the same E[x], E[x²] as a calibration pass, it keeps FLAP's units."""
    model, batches, shared, kappa = tiny_llama(), calibration(), [0, 5], 0.5
    layers = [i for i in range(model.config.num_hidden_layers) if i not in shared]
    inputs = projection_inputs(model, layers, batches)
    names = {"attn": "self_attn.o_proj", "mlp": "mlp.down_proj"}
    modules = {f"model.layers.{i}.{names[kind]}": x for (i, kind), x in inputs.items()}
    stats = ActivationStats(
        {m: x.mean(0).float() for m, x in modules.items()}, {m: (x**2).mean(0).float() for m, x in modules.items()}, 0
    )
    meta = {"shared_layers": shared, "correction": "mean"}
    central = SavedCentral(Path("in-memory"), model, word_tokenizer(), stats.mean, meta, training_stats=stats)
    expected, _ = flap_reference(model, layers, batches, kappa)
    assert build_pruner(central, "adaptive_stats").spec(kappa).ids() == expected
    with pytest.raises(ValueError, match="--twist.correction mean"):
        build_pruner(SavedCentral(Path("in-memory"), model, word_tokenizer(), {}, meta), "adaptive_stats")


def adaptive_magnitude_reference(model: torch.nn.Module, layers: list[int], kappa: float) -> dict:
    """Each unit's Σ w² over every weight it owns (a KV group: its query heads' q rows and o columns,
    its k and v rows; a neuron: gate and up rows, down column), standardised within its layer and
    kind (unbiased std), then AL-AM's global cut."""
    groups, q_per_kv, head_dim = kv_groups(model)
    by_group = {}
    for i in layers:
        attn, mlp = model.model.layers[i].self_attn, model.model.layers[i].mlp

        def sq(linear: torch.nn.Linear, dim: int) -> torch.Tensor:
            return linear.weight.detach().double().pow(2).sum(dim)

        scores = {
            "attn": sq(attn.q_proj, 1).reshape(groups, q_per_kv * head_dim).sum(1)
            + sq(attn.k_proj, 1).reshape(groups, head_dim).sum(1)
            + sq(attn.v_proj, 1).reshape(groups, head_dim).sum(1)
            + sq(attn.o_proj, 0).reshape(groups, q_per_kv * head_dim).sum(1),
            "mlp": sq(mlp.gate_proj, 1) + sq(mlp.up_proj, 1) + sq(mlp.down_proj, 0),
        }
        for kind, score in scores.items():
            by_group[i, kind] = (score - score.mean()) / score.std()
    return global_cut(by_group, unit_params(model), kappa)


@pytest.mark.parametrize(("shared", "kappa"), [([], 0.5), ([0, 5], 0.5), ([0, 5], 0.75)])
def test_adaptive_magnitude_keeps_exactly_the_units_of_its_reference(shared, kappa):
    model = tiny_llama()
    layers = [i for i in range(model.config.num_hidden_layers) if i not in shared]
    expected = adaptive_magnitude_reference(model, layers, kappa)
    assert all(expected.values())
    spec = pruner(model, "adaptive_magnitude", shared, []).spec(kappa)
    assert spec.ids() == expected
    uniform = pruner(model, "magnitude", shared, []).spec(kappa)
    assert any(len(spec.kept[key]) != len(uniform.kept[key]) for key in expected)  # widths adapt


UNIT_PARAMS = {  # the largest unit of the tiny presets: one Llama KV group (q, k, v rows, o columns); a GPT-2 head
    "llama": 64 * 16 * (2 * 2 + 2),
    "gpt2": 64 * 16 * 4 + 3 * 16,
}


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("kappa", [0.25, 0.5, 0.75])
def test_flap_adapts_widths_at_the_uniform_methods_size(arch, kappa):
    """Same parameter count as flap_uniform (to half a unit), but not its uniform widths."""
    model = random_model(arch)
    batches = calibration(model.config.vocab_size)
    flap = pruner(model, "flap", [], batches)
    spec, uniform = flap.spec(kappa), pruner(model, "flap_uniform", [], batches).spec(kappa)
    sizes = [parameter_count(build_subnet(model, s)[0]) for s in (spec, uniform)]
    assert abs(sizes[0] - sizes[1]) <= UNIT_PARAMS[arch] / 2
    widths = {unit_block.key: len(spec.kept[unit_block.key]) for unit_block in flap.unit_blocks}
    assert any(widths[key] != len(uniform.kept[key]) for key in widths)
    assert min(widths.values()) >= 1


def test_flap_keeps_one_unit_of_every_group_where_the_ranking_would_keep_none():
    """At a small κ FLAP's ranking empties whole groups; a zero-width layer cannot be exported, so
    each group's best unit is kept and the rest still fill the same budget."""
    model, batches, shared, kappa = tiny_llama(), calibration(), [0, 1, 4, 5], 0.05
    expected, scores = flap_reference(model, [2, 3], batches, kappa)
    assert not all(expected.values())
    pr = pruner(model, "flap", shared, batches)
    spec = pr.spec(kappa)
    assert all(len(spec.kept[unit_block.key]) >= 1 for unit_block in pr.unit_blocks)
    for key, ids in expected.items():
        if not ids:
            assert int(scores[key].argmax()) in spec.kept[key]
    uniform = pruner(model, "flap_uniform", shared, batches).spec(kappa)
    sizes = [parameter_count(build_subnet(model, s)[0]) for s in (spec, uniform)]
    assert abs(sizes[0] - sizes[1]) <= UNIT_PARAMS["llama"] / 2
