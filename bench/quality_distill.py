"""Distilled and rewired TwIST against pruning *with* recovery, at equal compute, over several seeds.

    python bench/quality.py --protocol distill            # small Llama, seeds 0 1 2
    python bench/quality.py --protocol distill --quick    # tiny Llama, seeds 0 1 2: under 10 minutes

The fine-tuning protocol's setting (bench/quality_tuning.py): one dense base pretrained on brown/train, every
run fine-tuned from it on wikitext-2/valid, perplexity on brown/test and wikitext-2/test, κ = 0.5, every
layer partitioned. Per seed (the fine-tuning's data order and draws; the base stays):

pipeline  what a practitioner who can afford training does: dense fine-tune on T tokens, prune post hoc
          (FLAP AL-AM, and the best of random / magnitude / wanda_sp), then a recovery fine-tune of the
          FLAP-pruned model on T/2 tokens: plain (cross-entropy), or distilled from the dense fine-tuned
          model (CE + KL to its full logits, T = 1) on as many tokens as the same compute pays for. The
          recoveries run in this process (the pruned model has adaptive widths: the trainer cannot load it),
          with the trainer's optimizer, schedule and batch.
twist     G = 2 groups on 2 processes, correction `mean`, every recipe given the pipeline's compute: its
          rounds are the pipeline's FLOPs over its own FLOPs per round. Recipes: `independent` (fresh
          draws), `independent_distill` (+ the central model as teacher), `independent_stored` (+ the
          base's top-32 logits, stored once over the blocks each rank trains on), `rewired_distill` (κ = 0.75 per
          group, `--twist.sampling rewired`: the top half of units in both groups; + the central teacher),
          `sandwich_distill` (BigNAS's sandwich with in-place distillation: group 0 at full width, group 1
          the first half of every block's units sorted by weight norm, `--twist.sampling nested`; + the
          central teacher); `independent_tokens` is `independent` on the pipeline's tokens (T + T/2).
compute   training FLOPs = 6 · (matmul weights of the trained model) per token, + 2 · (the teacher's) per
          token for every teacher forward; a TwIST group trains its κ-subnet, so a run costs the mean of its
          groups' subnets. Synchronisation and evaluation are not counted.

Each TwIST run's zero-cost exports at κ = 0.5 (the run's own methods, no calibration text) against the
pipeline's models; `best` = the export with the lowest perplexity on that test set. Mean and spread over the
seeds of every ratio. Writes bench/results/quality_distill{,_quick}.{json,md}.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time
from pathlib import Path

from measure import RESULTS
from quality_ablation_recipes import Recipe
from quality_common import TESTS, TRAIN_SECONDS, Budget, Run, calibration_for, train
from quality_distill_recipes import BASELINES, EQUAL_TOKENS, KAPPA, RECIPES, RECOVERY_SHARE
from quality_distill_report import markdown, ratios, summary
from quality_tuning import DENSE, TUNE_TEXT, Setting, budgets, setting, training_seconds, tune_overrides

TEACHER_WEIGHT, TEACHER_TEMPERATURE = 1.0, 1.0
EXPERIMENT = "bench-quality-distill"


def matmul_weights(model: object) -> int:
    """Weights a token multiplies through (every Linear, the LM head included even when tied)."""
    from torch import nn

    return sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))


def subnet_weights(model_dir: Path, kappas: tuple[float, ...]) -> dict[float, int]:
    """matmul_weights of each κ-subnet (uniform widths, every layer partitioned) of the model in `model_dir`."""
    from twist_scale.pruning.pruner import SavedCentral, build_pruner

    pruner = build_pruner(SavedCentral.load(model_dir), "random", shared_layers="none")
    return {k: matmul_weights(pruner.central.model if k == 1.0 else pruner.subnet(k, 0)[0]) for k in kappas}


def twist_flops_per_token(r: Recipe, weights: dict[float, int]) -> float:
    """The mean over groups of 6 · their subnet's weights, + 2 · the full model's for a teacher's forward (the
    central model's every step, or the stored base's once per token trained)."""
    kappas = r.group_kappas or (r.kappa,) * r.groups
    train_flops = statistics.fmean(6 * weights[k] for k in kappas)
    return train_flops + (2 * weights[1.0] if r.distill != "none" else 0)


def recover(
    pruned: object, tokenizer: object, teacher: object | None, budget: Budget, tokens: int, seed: int
) -> tuple[object, float, int]:
    """Fine-tune a pruned model in this process on the fine-tuning text: the trainer's AdamW, clipping, warm-up
    and cosine schedule and batch, for `tokens` tokens (whole steps); with a teacher, CE + KL to its logits.
    Returns the model, the seconds and the steps taken."""
    import torch
    from transformers import get_cosine_schedule_with_warmup

    from twist_scale.data import token_stream
    from twist_scale.distill import kl_to_teacher

    stream = token_stream([str(TUNE_TEXT)], tokenizer)
    blocks = stream[: len(stream) // budget.block * budget.block].view(-1, budget.block)
    order = torch.randperm(len(blocks), generator=torch.Generator().manual_seed(seed))
    rows, steps = budget.tokens_per_step // budget.block, max(1, tokens // budget.tokens_per_step)
    optimizer = torch.optim.AdamW(pruned.parameters(), lr=budget.lr, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    schedule = get_cosine_schedule_with_warmup(optimizer, min(20, steps // 3), steps)
    pruned.train()
    start = time.perf_counter()
    for step in range(steps):
        batch = blocks[order[[(step * rows + i) % len(order) for i in range(rows)]]]
        out = pruned(input_ids=batch, labels=batch)
        loss = out.loss
        if teacher is not None:
            with torch.no_grad():
                target = teacher(input_ids=batch).logits
            loss = loss + TEACHER_WEIGHT * TEACHER_TEMPERATURE**2 * kl_to_teacher(
                out.logits, target, TEACHER_TEMPERATURE
            )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(pruned.parameters(), 1.0)
        optimizer.step()
        schedule.step()
    return pruned.eval(), time.perf_counter() - start, steps


def held_out_ppl(model: object, tokenizer: object, s: Setting) -> dict[str, float]:
    from twist_scale.data import token_stream
    from twist_scale.evaluate import perplexity

    return {
        name: perplexity(model, token_stream([str(path)], tokenizer), s.window, max_windows=s.max_windows).ppl
        for name, path in TESTS.items()
    }


def fit(run: Run, s: Setting, budget: Budget, overrides: dict[str, object], reuse: bool) -> None:
    """Train one run, unless --reuse-runs finds it already trained (an interrupted protocol goes on)."""
    if not (reuse and (s.out / run.name / TRAIN_SECONDS).is_file()):
        train(run, s.out, budget, s.uri, EXPERIMENT, overrides)


def pipeline(s: Setting, args: argparse.Namespace) -> dict:
    """Dense fine-tune, post-hoc baselines at κ, FLAP's two recoveries; the compute they took."""
    from twist_scale.pruning.pruner import SavedCentral, build_pruner

    fit(DENSE, s, s.budget, tune_overrides(s.base, s.seed), args.reuse_runs)
    dense = SavedCentral.load(s.out / DENSE.name / "final")
    post_hoc = Recipe(DENSE.name, DENSE.config, 1, 1.0, DENSE.procs, "none", export=BASELINES)
    evaluated = s.evaluate(post_hoc, [KAPPA], args.draws)
    calibration = calibration_for("flap", TUNE_TEXT, dense.tokenizer, s.window)
    flap = build_pruner(dense, "flap", shared_layers="none", calibration=calibration)
    weights, flap_weights = matmul_weights(dense.model), matmul_weights(flap.subnet(KAPPA, 0)[0])
    rec_tokens = int(RECOVERY_SHARE * s.budget.tokens)
    compute = 6 * weights * s.budget.tokens + 6 * flap_weights * rec_tokens
    distilled_tokens = int(6 * flap_weights * rec_tokens / (6 * flap_weights + 2 * weights))
    recovered = {}
    for name, teacher, tokens in (("recovery", None, rec_tokens), ("recovery_distill", dense.model, distilled_tokens)):
        model, seconds, steps = recover(flap.subnet(KAPPA, 0)[0], dense.tokenizer, teacher, s.budget, tokens, s.seed)
        recovered[name] = {
            "ppl": held_out_ppl(model, dense.tokenizer, s),
            "tokens": steps * s.budget.tokens_per_step,
            "seconds": seconds,
        }
        print(f"flap + {name}: {recovered[name]}", flush=True)
    return {
        "train_seconds": training_seconds(s.out / DENSE.name),
        "tokens": s.budget.tokens + rec_tokens,
        "flops": compute,
        "weights": {"dense": weights, "flap": flap_weights},
        "dense_ppl": {t: evaluated["flap"][t]["full"]["ppl"] for t in TESTS},
        "baselines": {m: {t: evaluated[m][t][f"{KAPPA:.2f}"]["mean"] for t in TESTS} for m in BASELINES},
        **recovered,
    }


def twist_run(r: Recipe, rounds: int, s: Setting, args: argparse.Namespace, flops_per_token: float) -> dict:
    budget = dataclasses.replace(s.budget, rounds=rounds)
    fit(r, s, budget, r.overrides(s.base, s.seed), args.reuse_runs)
    evaluated = s.evaluate(r, [KAPPA], args.draws)
    return {
        "rounds": rounds,
        "tokens": budget.tokens,
        "flops": flops_per_token * budget.tokens,
        "train_seconds": training_seconds(s.out / r.name),
        "launch_seconds": float((s.out / r.name / TRAIN_SECONDS).read_text()),
        "exports": {m: {t: evaluated[m][t][f"{KAPPA:.2f}"]["mean"] for t in TESTS} for m in evaluated},
        "full_ppl": {t: next(iter(evaluated.values()))[t]["full"]["ppl"] for t in TESTS},
    }


def one_seed(args: argparse.Namespace, seed: int) -> dict:
    s = setting(argparse.Namespace(**{**vars(args), "seed": seed}), "distill")
    report = {"seed": seed, "pipeline": pipeline(s, args), "twist": {}}
    weights = subnet_weights(s.out / DENSE.name / "final", (1.0, 0.75, KAPPA))
    per_round = s.budget.local_steps * s.budget.tokens_per_step
    for r in (*RECIPES, EQUAL_TOKENS):
        flops = twist_flops_per_token(r, weights)
        if r is EQUAL_TOKENS:
            rounds = max(1, round(report["pipeline"]["tokens"] / per_round))
        else:
            rounds = max(1, round(report["pipeline"]["flops"] / (flops * per_round)))
        report["twist"][r.name] = twist_run(r, rounds, s, args, flops)
        print(f"seed {seed} {r.name}: {report['twist'][r.name]}", flush=True)
    report["ratios"] = ratios(report)
    return report


def distill(args: argparse.Namespace) -> None:
    """The protocol in the module docstring, over --seeds."""
    start = time.perf_counter()
    args = argparse.Namespace(**{**vars(args), "rounds": args.rounds or (3 if args.quick else 4)})
    seeds = [one_seed(args, seed) for seed in args.seeds]
    _, budget, window, windows = budgets(args)
    report = {
        "protocol": "distill",
        "quick": args.quick,
        "kappa": KAPPA,
        "budget": budget.__dict__,
        "budget_tokens": budget.tokens,
        "window": window,
        "windows": windows,
        "seeds": seeds,
        "summary": summary(seeds),
        "total_seconds": time.perf_counter() - start,
    }
    name = "quality_distill" + ("_quick" if args.quick else "")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(report, indent=2))
    table = markdown(report)
    (RESULTS / f"{name}.md").write_text(table)
    print(table)
