"""Quality after fine-tuning: TwIST's zero-cost subnets against post-hoc pruning, both from one pretrained model.

    python bench/quality.py --protocol finetune            # small Llama: 37 min on 2 cores shared with another job
    python bench/quality.py --protocol finetune --quick    # tiny Llama: ~6 min, 1.5 with the base cached

The paper's setting rather than training from scratch (bench/quality.py's default protocol):
  base   one dense small Llama pretrained on brown/train (8 rounds x 15 steps x 2,048 tokens; quick: tiny,
         4 x 5 x 512), cached in runs/bench_quality_base[_quick] and reused while its budget is unchanged
         (--retrain-base forces it). Its `final/` is a plain Hugging Face directory with its tokenizer, and
         every fine-tuning run loads it as a user loads a checkpoint: --model.pretrained DIR --data.tokenizer DIR.
  tune   from that base, on wikitext-2/valid, every run on the same tokens (6 rounds x 15 steps x 2,048 tokens,
         lr 1e-3; quick: 3 x 5 x 512): dense data parallel (1 group x 2 ranks), pruned post hoc at each κ by
         every baseline in twist_scale.pruning, the calibrated ones on wikitext-2/valid (the fine-tuning text);
         TwIST κ=0.5, G=2 (correction 'scale', every layer partitioned), exported zero-cost.
  wall   one more TwIST run given the dense run's training time instead of its tokens: its rounds are the
         equal-token run's scaled by dense seconds / TwIST seconds (training loop only, from the runs' MLflow
         metrics), since a subnet step is cheaper than a dense one.
  spread at κ=0.5, random's draws 0..7 of the equal-token TwIST run: min / max / mean perplexity and ± % of
         the mean, and the draw random_best exports (the lowest loss on 8 windows of the fine-tuning text) among them.
Perplexity on wikitext-2/test (in domain) and brown/test (the base's domain) with bench/quality.py's
protocol. The budget is sized for ~30 min here: fewer rounds than the scratch protocol (which takes 57),
and only G=2 with correction 'scale' (G=4 runs 4 processes on 2 cores: each would add ~10 min).
Writes bench/results/quality_finetune{,_quick}.{json,md,png}.
"""

from __future__ import annotations

import argparse
import dataclasses
import time

from quality_common import TESTS, TRAIN_SECONDS, Budget, Run, publish, ratios_to_best_baseline, tables, train
from quality_tuning import (
    DENSE,
    SPREAD_KAPPA,
    Setting,
    comparison,
    draw_spread,
    setting,
    spread_lines,
    training_seconds,
    tune_overrides,
)

EXPERIMENT = "bench-quality-finetune"
TWIST = Run("twist_k0.50_g2", "twist_brown.toml", 2, 0.5, 2)
TWIST_WALL = Run("twist_k0.50_g2_wall", "twist_brown.toml", 2, 0.5, 2)


def wall_rounds(rounds: int, dense_seconds: float, twist_seconds: float) -> int:
    """Rounds a TwIST run needs to train as long as the dense run did, never fewer than the equal-token run's."""
    return max(rounds, round(rounds * dense_seconds / twist_seconds))


def summary_lines(report: dict) -> list[str]:
    """Equal tokens and equal wall-clock side by side at κ=0.5."""
    s, runs = report["summary"], report["runs"]
    lines = [
        f"At κ = {SPREAD_KAPPA}: the best TwIST export against the best post-hoc baseline on the dense fine-tuned "
        "model (below 1: TwIST wins), and TwIST's full-width model against the dense one.",
        "",
        "| test set | best baseline | equal tokens: TwIST best | ratio | full width / dense "
        "| equal wall-clock: TwIST best | ratio | full width / dense |",
        "| --- | --- | --- | ---: | ---: | --- | ---: | ---: |",
    ]
    for test in TESTS:
        tok, wall = s["equal_tokens"][test], s["equal_wallclock"][test]
        lines.append(
            f"| {test} | {tok['best_baseline']} {tok['baseline_ppl']:.1f} | {tok['best_export']} "
            f"{tok['export_ppl']:.1f} | {tok['ratio']:.2f} | {tok['full_ratio']:.2f} | {wall['best_export']} "
            f"{wall['export_ppl']:.1f} | {wall['ratio']:.2f} | {wall['full_ratio']:.2f} |"
        )
    dense, tw, wall = (runs[n] for n in (DENSE.name, TWIST.name, TWIST_WALL.name))
    lines += [
        "",
        f"Training loop seconds: dense {dense['train_seconds']:.0f} ({dense['rounds']} rounds), TwIST equal tokens "
        f"{tw['train_seconds']:.0f} ({tw['rounds']} rounds), TwIST equal wall-clock {wall['train_seconds']:.0f} "
        f"({wall['rounds']} rounds, {wall['tokens']:,} tokens).",
    ]
    return lines


def markdown(report: dict, kappas: list[float]) -> str:
    base, budget = report["base"], report["budget"]
    before = " / ".join(f"{base['ppl'][t]:.1f}" for t in TESTS)
    header = (
        f"Base: dense {base['budget']['size']} Llama pretrained on brown/train ({base['tokens']:,} tokens), "
        f"perplexity {before} before fine-tuning. Fine-tuning on "
        f"wikitext-2/valid: {report['token_budget']:,} tokens per equal-token run ({budget['rounds']} rounds x "
        f"{budget['local_steps']} steps x {budget['tokens_per_step']:,} tokens), lr {budget['lr']}. Perplexity on "
        f"{' / '.join(TESTS)} (wikitext2 in domain; {report['windows']} windows of {report['window']} tokens each, "
        f"evenly spaced; random: mean of {report['draws']} draws). Every layer partitioned. `train s`: the training "
        "loop only."
    )
    body = [*summary_lines(report), "", *tables(report, kappas), "", *spread_lines([report["spread"]])]
    return "\n".join([header, "", *body]) + "\n"


def finetune(args: argparse.Namespace) -> None:
    """The protocol in the module docstring."""
    s = setting(args, "finetune")
    out, budget, uri = s.out, s.budget, s.uri
    runs = {run: budget for run in (DENSE, TWIST)}
    for run in runs:
        fit(run, s, budget, args.reuse_runs)
    seconds = {run: training_seconds(out / run.name) for run in runs}
    wall = dataclasses.replace(budget, rounds=wall_rounds(budget.rounds, seconds[DENSE], seconds[TWIST]))
    runs[TWIST_WALL] = wall
    fit(TWIST_WALL, s, wall, args.reuse_runs)
    report = s.report(args)
    report["runs"] = {run.name: s.entry(run, b, args.kappa, args.draws) for run, b in runs.items()}
    report["spread"] = draw_spread(out / TWIST.name, s.window, s.max_windows)
    report["ratios"] = ratios_to_best_baseline(report, args.kappa)
    report["summary"] = {
        "kappa": SPREAD_KAPPA,
        "equal_tokens": comparison(report, SPREAD_KAPPA, TWIST.name),
        "equal_wallclock": comparison(report, SPREAD_KAPPA, TWIST_WALL.name),
    }
    report["total_seconds"] = time.perf_counter() - s.start
    publish(report, markdown(report, args.kappa), uri, EXPERIMENT, out, f"quality_finetune{s.suffix}")


def fit(run: Run, s: Setting, budget: Budget, reuse: bool) -> None:
    """Fine-tune one run from the base, unless --reuse-runs finds it already trained."""
    if not (reuse and (s.out / run.name / TRAIN_SECONDS).is_file()):
        train(run, s.out, budget, s.uri, EXPERIMENT, tune_overrides(s.base, s.seed))
