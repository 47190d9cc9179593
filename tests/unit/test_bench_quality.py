"""The quality benchmarks' pure helpers: equal wall-clock budget, the picked draw's summary, ablation recipes."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))  # bench scripts import each other by name

from quality_finetune import wall_rounds  # noqa: E402
from quality_tuning import pick_summary  # noqa: E402


def test_wall_rounds_scales_by_the_time_ratio_and_never_shrinks() -> None:
    assert wall_rounds(6, dense_seconds=160.0, twist_seconds=100.0) == 10
    assert wall_rounds(6, dense_seconds=90.0, twist_seconds=100.0) == 6


def test_pick_summary_ranks_the_picked_draw_among_the_others() -> None:
    summary = pick_summary([120.0, 100.0, 110.0, 130.0], picked=2)
    assert summary["picked_ppl"] == 110.0
    assert summary["picked_rank"] == 2
    assert summary["mean"] == pytest.approx(115.0)
    assert summary["pm_pct"] == pytest.approx(50 * 30 / 115)
    assert summary["picked_to_mean"] == pytest.approx(110 / 115)


def test_nearest_divisor_keeps_the_step_budget() -> None:
    from quality_ablation_recipes import nearest_divisor

    assert nearest_divisor(90, 50) == 45  # the H=50 does not divide 90 steps
    assert nearest_divisor(90, 5) == 5
    assert nearest_divisor(15, 5 / 3) == 1
    assert nearest_divisor(12, 5) == 6  # 4 and 6 are as near: the larger, fewer rounds


def test_ablation_variants_change_one_factor_each_on_equal_steps() -> None:
    from quality_ablation_recipes import reference, variants
    from quality_common import Budget

    budget = Budget("small", 256, 2048, 15, 6, 1e-3)
    ref = reference(budget.local_steps)
    recipes = variants(ref, steps=90)
    assert recipes[0] == ref
    assert len({r.name for r in recipes}) == len(recipes)
    factors = ("correction", "optimizer_state", "local_steps", "groups", "shared_layers", "group_kappas", "sampling")
    by_name = {r.name: r for r in recipes}
    for recipe in recipes[1:]:
        origin = by_name[recipe.origin]  # nested: the sandwich, sampled nested; nested_*: nested, corrected
        changed = [f for f in factors if getattr(recipe, f) != getattr(origin, f)]
        assert len(changed) == 1, (recipe.name, changed)
        own = recipe.budget(budget)
        assert own.rounds * own.local_steps == 90 and own.tokens == budget.tokens
        assert recipe.kappa == ref.kappa
    assert sorted(r.local_steps for r in recipes if r.local_steps != 15) == [5, 45]
    assert {r.correction for r in recipes} == {"none", "scale", "mean"}
    assert {(r.groups, r.procs) for r in recipes} == {(2, 2), (4, 4)}
    assert {r.optimizer_state for r in recipes} == {"reset", "aggregate"}
    assert {r.group_kappas for r in recipes} == {(), (1.0, 0.5), (0.75, 0.5)}  # sandwich and mixed κ
    nested = [r for r in recipes if r.sampling == "nested"]
    assert [r.name for r in nested] == ["nested", "nested_none", "nested_mean"]
    assert all("prefix" in r.methods and r.group_kappas == (1.0, 0.5) for r in nested)


def test_quick_leaves_out_only_repeats_so_every_code_path_still_runs() -> None:
    from quality_ablation import repeats
    from quality_ablation_recipes import reference, variants

    ref = reference(5)  # --quick: 3 rounds x H=5
    recipes = variants(ref, steps=15)
    left_out = repeats(ref, recipes[1:])
    assert left_out == {"correction_none", "nested_none", "nested_mean", "h15"}
    kept = [r for r in recipes if r.name not in left_out]
    assert {r.correction for r in kept} == {"scale", "mean"}  # mean: adaptive_stats' statistics
    assert {r.local_steps for r in kept} == {1, 5}
    assert {r.sampling for r in kept} == {"independent", "nested"}
    assert {r.group_kappas for r in kept} == {(), (1.0, 0.5), (0.75, 0.5)}
    assert {r.groups for r in kept} == {2, 4} and {r.shared_layers for r in kept} == {"none", "auto"}
    assert {r.optimizer_state for r in kept} == {"reset", "aggregate"}


def test_recipe_budget_refuses_an_h_that_does_not_divide_the_steps() -> None:
    import dataclasses

    from quality_ablation_recipes import reference
    from quality_common import Budget

    with pytest.raises(ValueError, match="does not divide"):
        dataclasses.replace(reference(15), local_steps=50).budget(Budget("small", 256, 2048, 15, 6, 1e-3))


def test_ablation_winner_has_the_lowest_mean_ratio_over_test_sets() -> None:
    from quality_ablation import winner

    summary = {
        "reference": {"brown": {"ratio": 0.90}, "wikitext2": {"ratio": 1.00}},  # mean 0.95
        "h5": {"brown": {"ratio": 0.80}, "wikitext2": {"ratio": 1.20}},  # best on brown only, mean 1.00
        "g4": {"brown": {"ratio": 0.92}, "wikitext2": {"ratio": 0.94}},  # mean 0.93
    }
    assert winner(summary) == "g4"


def test_criterion_means_and_parameters_read_every_recipe() -> None:
    from quality_ablation import criterion_means, kappa_parameters

    def cells(brown: float, wiki: float, params: int = 10) -> dict:
        return {t: {"0.50": {"mean": v, "params": params}} for t, v in (("brown", brown), ("wikitext2", wiki))}

    report = {
        "runs": {
            "dense": {"eval": {"flap": cells(100.0, 50.0), "magnitude": cells(200.0, 40.0)}},
            "reference": {"eval": {"random": cells(90.0, 44.0), "magnitude": cells(110.0, 40.0)}},
            "h5": {"eval": {"random": cells(70.0, 36.0, params=11)}},
        }
    }
    means = criterion_means(report)  # best baseline: 100 on brown (flap), 40 on wikitext2 (magnitude)
    assert means["random"] == pytest.approx((0.9 + 1.1 + 0.7 + 0.9) / 4)
    assert means["magnitude"] == pytest.approx((1.1 + 1.0) / 2)
    assert "flap" not in means
    assert kappa_parameters(report) == {
        10: ["dense·flap", "dense·magnitude", "reference·random", "reference·magnitude"],
        11: ["h5·random"],
    }


def test_distill_protocol_counts_each_groups_subnet_and_the_teachers_forward() -> None:
    from quality_distill import RECIPES, twist_flops_per_token

    weights = {1.0: 1000, 0.75: 800, 0.5: 600}
    by_name = {r.name: r for r in RECIPES}
    assert twist_flops_per_token(by_name["independent"], weights) == 6 * 600
    assert twist_flops_per_token(by_name["independent_distill"], weights) == 6 * 600 + 2 * 1000
    assert twist_flops_per_token(by_name["independent_stored"], weights) == 6 * 600 + 2 * 1000
    assert twist_flops_per_token(by_name["rewired_distill"], weights) == 6 * 800 + 2 * 1000
    assert twist_flops_per_token(by_name["sandwich_distill"], weights) == (6 * 1000 + 6 * 600) / 2 + 2 * 1000
