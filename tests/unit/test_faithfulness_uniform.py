"""`wanda_sp` and `taylor` against their reference methods, recomputed here with plain torch: Wanda-sp
follows FLAP's `prune_wanda_sp`, Taylor LLM-Pruner's block-wise `TaylorImportance` (docs/pruning.md
quotes the lines). The references share no code with twist_scale.pruning."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from helpers.pruning import calibration, kv_groups, projection_inputs, pruner, tiny_llama


def wanda_sp_reference(
    model: torch.nn.Module, layers: list[int], batches: list[torch.Tensor], kappa: float, sequential: bool = True
) -> dict:
    """FLAP's `prune_wanda_sp` on Llama, step by step from its code.

    Layer by layer: scaler_row_j = running mean over calibration samples of Σ_tokens x_j² at the
    input of o_proj / down_proj (wanda's WrappedGPT); metric = (|W| · sqrt(scaler_row)).mean over
    output rows; per head the sum over its channels (here per KV group: its heads' sums added);
    prune the int(ratio·n) lowest: keep metric >= sort(metric)[int(ratio·n)], ratio = 1 − κ. Then the
    layer is pruned as `compress(..., unstr=True)` does — q/k/v rows and gate/up rows zeroed, no bias —
    and the next layer is measured on that model (`sequential`; False measures all on the dense one).
    """
    groups, q_per_kv, head_dim = kv_groups(model)
    pruned, ratio, kept = copy.deepcopy(model), 1 - kappa, {}
    samples = sum(b.shape[0] for b in batches)
    for i in layers:
        inputs = projection_inputs(pruned if sequential else model, [i], batches)
        attn, mlp = pruned.model.layers[i].self_attn, pruned.model.layers[i].mlp
        for kind, proj in (("attn", attn.o_proj), ("mlp", mlp.down_proj)):
            scaler_row = inputs[i, kind].pow(2).sum(0) / samples
            metric = (proj.weight.double().abs() * scaler_row.sqrt().reshape(1, -1)).mean(0)
            if kind == "attn":
                metric = metric.reshape(-1, head_dim).sum(1).reshape(groups, q_per_kv).sum(1)
            thresh = torch.sort(metric)[0][int(ratio * metric.numel())]
            kept[i, kind] = tuple((metric >= thresh).nonzero().flatten().tolist())
        with torch.no_grad():
            for g in set(range(groups)) - set(kept[i, "attn"]):
                attn.q_proj.weight[g * q_per_kv * head_dim : (g + 1) * q_per_kv * head_dim] = 0
                attn.k_proj.weight[g * head_dim : (g + 1) * head_dim] = 0
                attn.v_proj.weight[g * head_dim : (g + 1) * head_dim] = 0
            dropped = sorted(set(range(mlp.gate_proj.out_features)) - set(kept[i, "mlp"]))
            mlp.gate_proj.weight[dropped] = 0
            mlp.up_proj.weight[dropped] = 0
    return kept


def test_wanda_sp_reference_depends_on_the_pruned_prefix():
    """On this model the order of the passes changes the kept units, so the exact match below checks it."""
    model, batches, layers = tiny_llama(), calibration(), [1, 2, 3, 4]
    assert wanda_sp_reference(model, layers, batches, 0.5) != wanda_sp_reference(
        model, layers, batches, 0.5, sequential=False
    )


def taylor_reference(model: torch.nn.Module, layers: list[int], batches: list[torch.Tensor], kappa: float) -> dict:
    """LLM-Pruner's block-wise Taylor pruning of Llama ('param_first', group reduction 'sum'), from its code.

    One forward of all calibration examples as one batch with labels = inputs and one backward of
    that mean loss; salience = W ⊙ ∂L/∂W per parameter; per channel |salience| summed over the
    row (q/k/v, gate/up: output channels) or column (o, down: input channels); summed over the
    group's layers and over a head's channels (here a KV group: its query heads, its K and V head);
    per layer the lowest n − ⌈κ·n⌉ units by argsort are pruned.
    """
    groups, q_per_kv, head_dim = kv_groups(model)
    ref = copy.deepcopy(model)
    ids = torch.cat(batches)
    ref(input_ids=ids, labels=ids).loss.backward()

    def salience(linear: torch.nn.Linear, dim: int) -> torch.Tensor:
        return (linear.weight * linear.weight.grad).abs().sum(dim).double()

    kept = {}
    for i in layers:
        attn, mlp = ref.model.layers[i].self_attn, ref.model.layers[i].mlp
        per_head = salience(attn.q_proj, 1).reshape(groups * q_per_kv, head_dim).sum(1)
        scores = {
            "attn": per_head.reshape(groups, q_per_kv).sum(1)
            + salience(attn.k_proj, 1).reshape(groups, head_dim).sum(1)
            + salience(attn.v_proj, 1).reshape(groups, head_dim).sum(1)
            + salience(attn.o_proj, 0).reshape(groups, q_per_kv * head_dim).sum(1),
            "mlp": salience(mlp.gate_proj, 1) + salience(mlp.up_proj, 1) + salience(mlp.down_proj, 0),
        }
        for kind, imp in scores.items():
            pruned = torch.argsort(imp)[: imp.numel() - math.ceil(kappa * imp.numel())]
            kept[i, kind] = tuple(sorted(set(range(imp.numel())) - set(pruned.tolist())))
    return kept


UNIFORM_REFERENCES = {"wanda_sp": wanda_sp_reference, "taylor": taylor_reference}


@pytest.mark.parametrize("name", sorted(UNIFORM_REFERENCES))
@pytest.mark.parametrize(("shared", "kappa"), [([], 0.5), ([0, 5], 0.5), ([0, 5], 0.75)])
def test_uniform_methods_keep_exactly_the_units_of_their_reference(name, shared, kappa):
    model, batches = tiny_llama(), calibration()
    layers = [i for i in range(model.config.num_hidden_layers) if i not in shared]
    expected = UNIFORM_REFERENCES[name](model, layers, batches, kappa)
    assert pruner(model, name, shared, batches).spec(kappa).ids() == expected
