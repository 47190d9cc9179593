"""Sampling (coverage, quotas, determinism), unit maps and the sliced-vs-masked oracle."""

from __future__ import annotations

import copy
import random

import pytest
import torch

from twist_scale.correction import ACT_MEAN, ACT_SQ_MEAN, correction_of, dropped_contribution, keep_statistics_fp32
from twist_scale.coverage import coverage_draw
from twist_scale.models import architecture_of, build_model, units_to_keep
from twist_scale.subnet import (
    SubnetSampler,
    apply_subnet_shapes,
    apply_unit_masks,
    default_shared_layers,
    partitioned_blocks,
)


def _draw(seed: int, n: int, keeps: list[int]) -> list[tuple[int, ...]]:
    return [tuple(row.nonzero().flatten().tolist()) for row in coverage_draw(f"seed {seed}", n, keeps)]


def _coverage_draw_in_python(rng: random.Random, num_units: int, keeps: list[int]) -> list[tuple[int, ...]]:
    """The draw as twist-scale first wrote it, in Python: what every subnet of every run is defined by."""
    order = list(range(num_units))
    rng.shuffle(order)
    groups = len(keeps)
    held: list[set[int]] = [set() for _ in keeps]
    turn = 0
    for unit in order:
        for _ in range(groups):
            if len(held[turn]) < keeps[turn]:
                break
            turn = (turn + 1) % groups
        else:
            break
        held[turn].add(unit)
        turn = (turn + 1) % groups
    for g in range(groups):
        missing = [u for u in order if u not in held[g]]
        rng.shuffle(missing)
        held[g].update(missing[: keeps[g] - len(held[g])])
    return [tuple(sorted(h)) for h in held]


@pytest.mark.parametrize(
    ("n", "keeps"),
    [(1, [1]), (2, [1, 1]), (8, [4, 4]), (12, [6, 4, 2]), (16, [4, 8, 3, 1]), (9, [1, 8]), (33, [3, 3]),
     (257, [65] * 4), (1000, [1000, 500, 250]), (3000, [750] * 8)],
)  # fmt: skip
def test_draws_are_pythons_word_for_word(n, keeps):
    """Compiled, the draw still consumes Python's generator as `random.shuffle` does: the same subnets."""
    for seed in range(12):
        assert _draw(seed, n, keeps) == _coverage_draw_in_python(random.Random(f"seed {seed}"), n, keeps)


@pytest.mark.parametrize(("n", "groups", "kappa"), [(8, 2, 0.5), (8, 4, 0.25), (10, 3, 0.4), (12, 4, 0.5), (7, 2, 0.9)])
def test_coverage_and_exact_quotas(n, groups, kappa):
    keep = units_to_keep(n, kappa)
    for seed in range(20):
        draws = _draw(seed, n, [keep] * groups)
        assert all(len(d) == keep == len(set(d)) for d in draws)
        assert set().union(*map(set, draws)) == set(range(n))  # every unit trains somewhere


def _round_robin(rng: random.Random, n: int, groups: int, keep: int) -> list[tuple[int, ...]]:
    """The equal-kappa deal written out: unit order[i] to group i mod G, then each group topped up."""
    order = list(range(n))
    rng.shuffle(order)
    held = [set(order[g::groups][:keep]) for g in range(groups)]
    for h in held:
        missing = [u for u in order if u not in h]
        rng.shuffle(missing)
        h.update(missing[: keep - len(h)])
    return [tuple(sorted(h)) for h in held]


@pytest.mark.parametrize(("n", "groups", "keep"), [(8, 2, 4), (10, 3, 4), (12, 4, 2), (7, 2, 6)])
def test_equal_keeps_deal_round_robin(n, groups, keep):
    """Mixed-kappa dealing leaves every equal-kappa draw exactly as it was."""
    for seed in range(10):
        assert _draw(seed, n, [keep] * groups) == _round_robin(random.Random(f"seed {seed}"), n, groups, keep)


@pytest.mark.parametrize(("n", "keeps"), [(8, [8, 4]), (10, [8, 2]), (12, [6, 4, 2]), (16, [4, 8, 3, 1]), (9, [1, 8])])
def test_mixed_keeps_cover_every_unit_at_exact_quotas(n, keeps):
    for seed in range(20):
        draws = _draw(seed, n, keeps)
        assert [len(set(d)) for d in draws] == [len(d) for d in draws] == keeps
        assert set().union(*map(set, draws)) == set(range(n)), (seed, draws)


def test_sandwich_sampler_keeps_group_zero_whole():
    model = build_model("llama", "tiny", 64)
    unit_blocks = tuple(partitioned_blocks(architecture_of(model).unit_blocks(model.config), []))
    full, half = SubnetSampler(unit_blocks, (1.0, 0.5), seed=3).specs(2)
    assert all(full.ids()[unit_block.key] == tuple(range(unit_block.num_units)) for unit_block in unit_blocks)
    assert all(len(half.kept[unit_block.key]) == units_to_keep(unit_block.num_units, 0.5) for unit_block in unit_blocks)


def test_nested_sampler_keeps_the_same_prefix_of_every_block_in_every_round():
    model = build_model("llama", "tiny", 64)
    unit_blocks = tuple(partitioned_blocks(architecture_of(model).unit_blocks(model.config), []))
    nested = SubnetSampler(unit_blocks, (1.0, 0.5, 0.25), seed=3, sampling="nested")
    for round_ in (0, 7):
        full, half, quarter = nested.specs(round_)
        for unit_block in unit_blocks:
            assert full.ids()[unit_block.key] == tuple(range(unit_block.num_units))
            assert half.ids()[unit_block.key] == tuple(range(units_to_keep(unit_block.num_units, 0.5)))
            assert quarter.ids()[unit_block.key] == tuple(range(units_to_keep(unit_block.num_units, 0.25)))
    independent = SubnetSampler(unit_blocks, (1.0, 0.5, 0.25), seed=3)
    assert independent.specs(0)[1] != independent.specs(1)[1] != nested.specs(0)[1]


@pytest.mark.parametrize("kappas", [(0.75, 0.75), (0.5,) * 4, (1.0, 0.5), (0.75, 0.5), (0.5, 0.5)])
def test_rewired_groups_share_the_most_important_units_and_still_cover_every_unit(kappas):
    model = build_model("llama", "tiny", 64)
    unit_blocks = tuple(partitioned_blocks(architecture_of(model).unit_blocks(model.config), []))
    generator = torch.Generator().manual_seed(len(kappas))
    importance = {block.key: torch.randn(block.num_units, generator=generator) for block in unit_blocks}
    rewired = SubnetSampler(unit_blocks, kappas, seed=3, sampling="rewired")
    independent = SubnetSampler(unit_blocks, kappas, seed=3)
    for round_ in (0, 1):
        specs = rewired.specs(round_, importance)
        for block in unit_blocks:
            n, keeps = block.num_units, [units_to_keep(block.num_units, k) for k in kappas]
            kept = [set(spec.units(block).tolist()) for spec in specs]
            assert [len(k) for k in kept] == keeps
            assert set().union(*kept) == set(range(n)), (round_, block.key)  # every unit trains somewhere
            core = (sum(keeps) - n) // (len(keeps) - 1)  # (Σ keep - n) / (G - 1), at most the smallest keep
            top = set(torch.sort(-importance[block.key], stable=True).indices[: min(core, min(keeps))].tolist())
            assert all(top <= k for k in kept), (kappas, block.key)  # ... and the top ones train everywhere
        if sum(kappas) == 1:  # no slack: the coverage draw itself
            assert specs == independent.specs(round_)
    assert rewired.specs(0) == independent.specs(0)  # nothing ranked yet (no statistics): no unit preferred
    flat = {key: torch.zeros_like(scores) for key, scores in importance.items()}
    assert rewired.specs(0, flat) == independent.specs(0)


def test_kappa_times_groups_one_is_a_partition():
    draws = _draw(0, 12, [3] * 4)
    assert sorted(u for d in draws for u in d) == list(range(12))


def test_keep_count_is_robust_to_float_noise():
    assert units_to_keep(10, 0.3) == 3 and units_to_keep(4, 0.5) == 2 and units_to_keep(3, 0.5) == 2
    assert units_to_keep(5, 0.01) == 1


def test_sampling_is_a_pure_function_of_seed_and_round():
    model = build_model("llama", "tiny", 64)
    unit_blocks = tuple(partitioned_blocks(architecture_of(model).unit_blocks(model.config), []))
    a, b = SubnetSampler(unit_blocks, (0.5,) * 2, seed=3), SubnetSampler(unit_blocks, (0.5,) * 2, seed=3)
    assert a.specs(5) == b.specs(5)
    assert a.specs(5) != a.specs(6)
    assert a.specs(5) != SubnetSampler(unit_blocks, (0.5,) * 2, seed=4).specs(5)
    assert a.specs(5)[0].fingerprint() != a.specs(5)[1].fingerprint()


def test_default_shared_layers():
    assert default_shared_layers(12) == [0, 1, 10, 11] and default_shared_layers(6) == [0, 1, 4, 5]
    assert default_shared_layers(4) == []


CASES = [("llama", "tiny"), ("llama", "tiny-mha"), ("gpt2", "tiny")]


def _pair(arch, size, correction, kappa=0.5, shared=(0,)):
    torch.manual_seed(0)
    full = build_model(arch, size, 97).eval()
    strategy = correction_of(correction)
    unit_blocks = strategy.unit_blocks(partitioned_blocks(architecture_of(full).unit_blocks(full.config), shared))
    strategy.install(full, unit_blocks, momentum=0.9)
    for name, buf in full.named_buffers():
        if name.endswith(ACT_MEAN):
            buf.copy_(torch.randn_like(buf))
    means = {
        unit_block.output_module: full.get_buffer(f"{unit_block.output_module}.{ACT_MEAN}")
        for unit_block in unit_blocks
        if correction == "mean"
    }
    spec = SubnetSampler(tuple(unit_blocks), (kappa,) * 2, seed=1).specs(0)[1]
    sub = copy.deepcopy(full)
    apply_subnet_shapes(sub, unit_blocks, spec)
    params = dict(full.named_parameters())
    for unit_block in unit_blocks:  # what dispatch does, from the full-width weights
        weight, kept = params[unit_block.output_axis.name].detach(), spec.units(unit_block)
        shift = None
        if strategy.needs_shift:
            shift = dropped_contribution(weight, means[unit_block.output_module], unit_block, kept)
        for model in (sub, full):
            strategy.dispatch(model.get_submodule(unit_block.output_module), unit_block, kept, shift)
    apply_unit_masks(full, unit_blocks, spec)
    return full, sub, unit_blocks, spec


@pytest.mark.parametrize(("arch", "size"), CASES)
@pytest.mark.parametrize("correction", ["none", "scale", "mean"])
def test_sliced_submodel_equals_masked_full_model(arch, size, correction):
    masked, sub, unit_blocks, spec = _pair(arch, size, correction)
    ids = torch.randint(0, 97, (2, 16))
    with torch.no_grad():
        expected, got = masked(ids).logits, sub(ids).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    # physically smaller: fewer parameters, exactly the kept units' share
    n_full = sum(p.numel() for p in masked.parameters())
    n_sub = sum(p.numel() for p in sub.parameters())
    params = dict(masked.named_parameters())
    dropped = sum(
        params[ax.name].numel() * (1 - len(spec.units(unit_block)) / unit_block.num_units)
        for unit_block in unit_blocks
        for ax in unit_block.axes
        if ax.name in params
    )
    assert n_sub == n_full - round(dropped)


def test_correction_changes_the_forward():
    """Guards the oracle test against vacuous hooks: each mode gives different logits."""
    ids = torch.randint(0, 97, (1, 8))
    with torch.no_grad():
        outs = [_pair("llama", "tiny", mode)[1](ids).logits for mode in ("none", "scale", "mean")]
    assert not torch.allclose(outs[0], outs[1]) and not torch.allclose(outs[0], outs[2])


def test_mean_correction_tracks_activations_in_training_only():
    """Running E[x] and E[x²] of the output projection's input: one momentum step per training forward."""
    _, sub, unit_blocks, _ = _pair("llama", "tiny", "mean")
    module = sub.get_submodule(unit_blocks[0].output_module)
    mean, sq_mean = module.get_buffer(ACT_MEAN), module.get_buffer(ACT_SQ_MEAN)
    before = mean.clone(), sq_mean.clone()
    seen = []
    module.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach().reshape(-1, args[0].shape[-1])))
    with torch.no_grad():
        sub.eval()(torch.randint(0, 97, (1, 8)))
        assert torch.equal(mean, before[0]) and torch.equal(sq_mean, before[1])
        seen.clear()
        sub.train()(torch.randint(0, 97, (1, 8)))
    x = seen[0].float()
    torch.testing.assert_close(mean, 0.9 * before[0] + 0.1 * x.mean(0))
    torch.testing.assert_close(sq_mean, 0.9 * before[1] + 0.1 * (x**2).mean(0))


def test_scale_correction_keeps_its_fp32_factor_in_a_bf16_model():
    """A bf16 engine casts the module; 1/kappa must still be the exact factor export folds (4/3, not 1.3359)."""
    model = build_model("llama", "tiny", 97)
    unit_blocks = partitioned_blocks(architecture_of(model).unit_blocks(model.config), [])
    scale = correction_of("scale")
    scale.install(model, unit_blocks, 0.99)
    spec = SubnetSampler(tuple(unit_blocks), (0.75,), seed=0).specs(0)[0]
    for unit_block in unit_blocks:
        module = model.get_submodule(unit_block.output_module)
        scale.dispatch(module, unit_block, spec.units(unit_block), None)
    model.bfloat16()  # what DeepSpeed's bf16 engine does to the module and its buffers
    unit_block = unit_blocks[-1]  # an MLP group: 1/kappa is a non-dyadic 4/3
    module = model.get_submodule(unit_block.output_module)
    factor = unit_block.num_units / len(spec.units(unit_block))
    assert abs(factor - 4 / 3) < 1e-12
    x = torch.randn(2, 5, module.in_features).bfloat16()
    with torch.no_grad():
        expected = torch.nn.functional.linear((x.float() * factor).bfloat16(), module.weight)
        assert torch.equal(module(x), expected)


def test_activation_means_stay_fp32_in_a_bf16_model():
    _, sub, unit_blocks, _ = _pair("llama", "tiny", "mean")
    sub.bfloat16()
    keep_statistics_fp32(sub)
    module = sub.get_submodule(unit_blocks[0].output_module)
    assert module.get_buffer(ACT_MEAN).dtype == torch.float32 and module.twist_shift.dtype == torch.float32
    sub.train()(torch.randint(0, 97, (1, 8)))  # the running mean accumulates in fp32 beside bf16 activations
    assert module.get_buffer(ACT_MEAN).dtype == torch.float32
