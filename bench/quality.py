"""Quality at an equal token budget: TwIST's zero-cost subnets against post-hoc pruning of a dense model.

    python bench/quality.py            # small Llama (17.3M, vocab 4096) on brown/train: 57 min on 2 cores
    python bench/quality.py --quick    # tiny Llama, a few rounds: the whole pipeline in ~6 min
    python bench/quality.py --protocol finetune [--quick]   # from one pretrained base: bench/quality_finetune.py
    python bench/quality.py --protocol ablation [--quick]   # one factor of the recipe at a time: quality_ablation.py
    python bench/quality.py --protocol spread [--quick]     # random draws of the ablation's runs: quality_spread.py
    python bench/quality.py --protocol distill [--quick]    # distilled, rewired TwIST vs pruning + recovery, 3 seeds

Trains on brown/train, one run after another under the real `deepspeed` launcher, every run on the
same number of tokens and optimizer steps:
  (a) dense data parallel (1 group x 2 ranks), then pruned post hoc at each κ with every baseline in
      twist_scale.pruning (random, magnitude, wanda_sp, flap, flap_uniform; no fine-tuning; FLAP
      calibrated as its paper does, 1024 windows of 128 tokens);
  (b) TwIST: κ=0.5 with 2 groups, κ=0.5 with 4 groups (correction 'scale', and again with 'mean'),
      κ=0.25 with 4 groups (G x 1 rank), then exported zero-cost at each κ, with no calibration text:
      a seeded random draw, unit weight norms (magnitude), standardised weight norms with adaptive
      widths (adaptive_magnitude) and, for the 'mean' run, FLAP's ranking on the activation
      statistics kept in training (adaptive_stats); and once with a look at data, random_best: of 8
      random draws, the one with the lowest loss on 8 windows of the training text (forward passes only).
Every layer is partitioned (no shared layers) in training and pruning, so at a given κ every method's
model has the same parameter count. Perplexity on brown/test and wikitext-2/test (out of domain)
with twist_scale.evaluate's protocol on an evenly spaced subset of windows (--max_windows: the
full wikitext-2 split takes ~100 s per model here). Every evaluation is also logged to the runs'
shared MLflow store, and `twist-compare` draws the perplexity-vs-sparsity chart from it.
Writes bench/results/quality{,_quick}.{json,md,png}, with each TwIST export's ratio to the best
baseline at the same κ.
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

import torch
from measure import REPO
from quality_ablation import ablation
from quality_common import (
    QUICK_WINDOW,
    TESTS,
    TRAIN_SECONDS,
    Budget,
    Run,
    evaluate_run,
    publish,
    ratios_to_best_baseline,
    report_header,
    tables,
    train,
)
from quality_distill import distill
from quality_finetune import finetune
from quality_spread import spread

EXPERIMENT = "bench-quality"
PROTOCOLS = (
    "scratch: every run from a random initialisation on brown/train (this docstring); finetune: every run from "
    "one dense base pretrained on brown/train, fine-tuned on wikitext-2/valid (bench/quality_finetune.py); ablation: "
    "the fine-tuning protocol's TwIST run with one factor of its recipe changed at a time (bench/quality_ablation.py); "
    "spread: how far apart random draws of the ablation's runs are, and what random_best picks "
    "(bench/quality_spread.py); distill: distilled and rewired TwIST against pruning with a recovery fine-tune, at "
    "equal compute, over --seeds (bench/quality_distill.py)"
)


RUNS = (
    Run("dense", "dense_brown.toml", 1, 1.0, 2, correction="none"),
    Run("twist_k0.50_g2", "twist_brown.toml", 2, 0.5, 2),
    Run("twist_k0.50_g4", "twist_brown.toml", 4, 0.5, 4),
    Run("twist_k0.50_g4_mean", "twist_brown.toml", 4, 0.5, 4, correction="mean"),
    Run("twist_k0.25_g4", "twist_brown.toml", 4, 0.25, 4),
)


def markdown(report: dict, kappas: list[float]) -> str:
    budget = report["budget"]
    header = (
        f"Token budget per run: {report['token_budget']:,} tokens ({budget['rounds']} rounds x {budget['local_steps']} "
        f"steps x {budget['tokens_per_step']:,} tokens), model {budget['size']}, lr {budget['lr']}. "
        f"Perplexity on {' / '.join(TESTS)} ({report['windows']} windows of {report['window']} tokens each, evenly "
        f"spaced; random: mean of {report['draws']} draws). Every layer partitioned."
    )
    return "\n".join([header, "", *tables(report, kappas)]) + "\n"


def scratch(args: argparse.Namespace) -> None:
    """The protocol in the module docstring: every run trained from a random initialisation."""
    rounds, lr = args.rounds or 16, args.lr or 2e-3
    if args.quick:
        budget = Budget("tiny", 64, 64 * 8, 5, 3, lr)
        window, max_windows = QUICK_WINDOW, 16
    else:
        budget = Budget("small", 256, 256 * 8, args.local_steps, rounds, lr)
        window, max_windows = 256, args.max_windows
    out = args.out or REPO / "runs" / "bench_quality"
    print(
        f"configuration: {budget}, tokens {budget.tokens:,}, window {window}, max_windows {max_windows}, "
        f"draws {args.draws}, kappas {args.kappa}, runs {[r.name for r in RUNS]}, torch threads "
        f"{torch.get_num_threads()}",
        flush=True,
    )
    if not args.reuse_runs and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    from twist_scale.tracking import default_uri

    uri = default_uri(out)
    report: dict = {**report_header(budget, args, window, max_windows), "runs": {}}
    for run in RUNS:
        done = out / run.name / TRAIN_SECONDS
        seconds = (
            float(done.read_text()) if args.reuse_runs and done.is_file() else train(run, out, budget, uri, EXPERIMENT)
        )
        report["runs"][run.name] = {
            "groups": run.groups,
            "kappa": run.kappa,
            "procs": run.procs,
            "train_seconds": seconds,
        }
    start = time.perf_counter()
    for run in RUNS:
        report["runs"][run.name]["eval"] = evaluate_run(run, out, args.kappa, args.draws, window, max_windows, uri)
    report["eval_seconds"] = time.perf_counter() - start
    report["total_seconds"] = report["eval_seconds"] + sum(r["train_seconds"] for r in report["runs"].values())
    report["ratios"] = ratios_to_best_baseline(report, args.kappa)
    publish(report, markdown(report, args.kappa), uri, EXPERIMENT, out, "quality_quick" if args.quick else "quality")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    protocols = {"scratch": scratch, "finetune": finetune, "ablation": ablation, "spread": spread, "distill": distill}
    parser.add_argument("--protocol", choices=protocols, default="scratch", help=PROTOCOLS)
    parser.add_argument("--quick", action="store_true", help="tiny model, few rounds: minutes")
    parser.add_argument("--rounds", type=int, help="rounds of --local-steps steps, every run (scratch 16, finetune 6)")
    parser.add_argument("--local-steps", type=int, default=15, help="H: steps between aggregations")
    parser.add_argument(
        "--lr", type=float, help="peak learning rate (scratch 2e-3, finetune 1e-3); finetune, ablation: *_lr<LR>"
    )
    parser.add_argument("--draws", type=int, default=2, help="random draws per κ")
    parser.add_argument("--kappa", type=float, nargs="+", default=[0.75, 0.5, 0.25])
    parser.add_argument("--max_windows", type=int, default=64, help="windows scored per test set (0: all)")
    parser.add_argument(
        "--out", type=Path, help="runs directory (default runs/bench_quality[_finetune|_ablation][_quick])"
    )
    parser.add_argument("--reuse-runs", action="store_true", help="only evaluate runs this script already trained")
    parser.add_argument(
        "--retrain-base", action="store_true", help="finetune, ablation: pretrain the base again even if cached"
    )
    parser.add_argument("--drop", nargs="+", default=[], help="ablation: leave these recipes out (e.g. g4)")
    parser.add_argument(
        "--seed",
        type=int,
        default=0,
        help="finetune, ablation: seed of every fine-tuning run (the base stays); not 0: runs and results *_seed<N> "
        "(spread: reads the ablation's runs at that seed and --lr)",
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="distill: the fine-tuning seeds")
    args = parser.parse_args()
    if args.seed and args.protocol == "scratch":
        parser.error("--seed applies to the finetune, ablation and spread protocols, not scratch")
    protocols[args.protocol](args)


if __name__ == "__main__":
    main()
