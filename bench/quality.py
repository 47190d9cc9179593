"""Quality at an equal token budget: TwIST's zero-cost subnets against post-hoc pruning of a dense model.

    python bench/quality.py            # small Llama (17.3M, vocab 4096) on brown/train: 57 min on 2 cores
    python bench/quality.py --quick    # tiny Llama, a few rounds: the whole pipeline in ~6 min
    python bench/quality.py --protocol finetune [--quick]   # from one pretrained base: bench/quality_finetune.py
    python bench/quality.py --protocol ablation [--quick]   # one factor of the recipe at a time: quality_ablation.py
    python bench/quality.py --protocol spread [--quick]     # random draws of the ablation's runs: quality_spread.py

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
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from measure import REPO, RESULTS, launch

DATA = (REPO / ".." / "shared" / "data").resolve()
TRAIN = DATA / "brown" / "train.txt"
TESTS = {"brown": DATA / "brown" / "test.txt", "wikitext2": DATA / "wikitext-2" / "test.txt"}
BASELINES = ("random", "magnitude", "wanda_sp", "flap", "flap_uniform")
TWIST_METHODS = ("random", "magnitude", "adaptive_magnitude")  # zero-cost: no calibration text
STATS_METHODS = ("adaptive_stats",)  # zero-cost from the statistics a correction 'mean' run keeps
PICKED_METHODS = ("random_best",)  # TwIST's draws, the best of 8 on a few windows of the training text
QUICK_WINDOW = 64
EXPERIMENT = "bench-quality"
TRAIN_SECONDS = "bench_train_seconds"
PROTOCOLS = (
    "scratch: every run from a random initialisation on brown/train (this docstring); finetune: every run from "
    "one dense base pretrained on brown/train, fine-tuned on wikitext-2/valid (bench/quality_finetune.py); ablation: "
    "the fine-tuning protocol's TwIST run with one factor of its recipe changed at a time (bench/quality_ablation.py); "
    "spread: how far apart random draws of the ablation's runs are, and what random_best picks "
    "(bench/quality_spread.py)"
)


@dataclass(frozen=True)
class Run:
    name: str
    config: str
    groups: int
    kappa: float
    procs: int
    correction: str = "scale"

    @property
    def dense(self) -> bool:
        return self.groups == 1

    @property
    def methods(self) -> tuple[str, ...]:
        if self.dense:
            return BASELINES
        return TWIST_METHODS + PICKED_METHODS + (STATS_METHODS if self.correction == "mean" else ())


RUNS = (
    Run("dense", "dense_brown.toml", 1, 1.0, 2, correction="none"),
    Run("twist_k0.50_g2", "twist_brown.toml", 2, 0.5, 2),
    Run("twist_k0.50_g4", "twist_brown.toml", 4, 0.5, 4),
    Run("twist_k0.50_g4_mean", "twist_brown.toml", 4, 0.5, 4, correction="mean"),
    Run("twist_k0.25_g4", "twist_brown.toml", 4, 0.25, 4),
)


@dataclass(frozen=True)
class Budget:
    """What every run shares: the same tokens in the same number of optimizer steps per process."""

    size: str
    block: int
    tokens_per_step: int  # over all processes
    local_steps: int
    rounds: int
    lr: float

    @property
    def tokens(self) -> int:
        return self.rounds * self.local_steps * self.tokens_per_step


def train(
    run: Run, out: Path, budget: Budget, uri: str, experiment: str = EXPERIMENT, extra: dict[str, object] | None = None
) -> float:
    """Train one run to out/<name>/final; returns its wall seconds (launch included), also kept in the run.

    `extra` adds overrides on top of the budget's (fine-tuning: the pretrained model, its tokenizer, the text).
    """
    overrides = {
        "model.size": budget.size,
        "data.block_size": budget.block,
        "data.micro_batch_size": budget.tokens_per_step // (budget.block * run.procs),
        "optim.lr": budget.lr,
        "twist.groups": run.groups,
        "twist.kappa": run.kappa,
        "twist.correction": run.correction,
        "twist.shared_layers": "",
        "twist.local_steps": budget.local_steps,
        "twist.rounds": budget.rounds,
        "tracking.uri": uri,
        "tracking.experiment": experiment,
        **(extra or {}),
    }
    start = time.perf_counter()
    launch(out / run.name, run.config, overrides, run.procs, quiet=False)
    seconds = time.perf_counter() - start
    (out / run.name / TRAIN_SECONDS).write_text(f"{seconds}\n")
    return seconds


def calibration_for(method: str, text: Path, tokenizer: object, window: int) -> list | None:
    """The calibration batches a method reads from `text` (None if it reads none): its reference setting, or
    32 windows of the quick protocol's length when the evaluation window is that short."""
    from twist_scale.pruning.calibration import calibration_from_files
    from twist_scale.pruning.methods import method as prune_method

    chosen = prune_method(method)
    if not chosen.calibrated:
        return None
    samples, seqlen = chosen.calibration if window > QUICK_WINDOW else (32, QUICK_WINDOW)
    return calibration_from_files([str(text)], tokenizer, samples=samples, seqlen=seqlen)


def evaluate_run(
    run: Run,
    out: Path,
    kappas: list[float],
    draws: int,
    window: int,
    max_windows: int,
    uri: str,
    calibration_file: Path = TRAIN,
    shared_layers: str = "none",
    log: bool = True,
) -> dict:
    """Every method at every κ on both test sets, in this process; logged onto the run's MLflow run when `log`.

    Calibrated baselines read `calibration_file`: the text the run trained on, as a user pruning it would.
    `shared_layers` 'none' prunes every layer (every method's model at a κ has the same parameter count);
    'auto' keeps whole the layers training kept whole.
    """
    from twist_scale.data import token_stream
    from twist_scale.evaluate import log_sweep, sweep
    from twist_scale.pruning.pruner import SavedCentral, build_pruner

    central = SavedCentral.load(out / run.name / "final")
    streams = {name: token_stream([str(path)], central.tokenizer) for name, path in TESTS.items()}
    run_id = (out / run.name / "mlflow_run_id").read_text().strip()
    results: dict = {}
    for method in run.methods:
        calibration = calibration_for(method, calibration_file, central.tokenizer, window)
        pruner = build_pruner(central, method, shared_layers=shared_layers, calibration=calibration)
        for test, stream in streams.items():
            start = time.perf_counter()
            result = sweep(pruner, stream, kappas, draws, window, label=f"{method}_{test}", max_windows=max_windows)
            if log:
                log_sweep(result, uri, run_id)
            results.setdefault(method, {})[test] = {
                "full": {"ppl": result.full.ppl, "params": result.full_parameters, "windows": result.full.windows},
                **{
                    f"{r.kappa:.2f}": {**r.summary(), "draws": len(r.ppls), "params": r.parameters}
                    for r in result.results
                },
            }
            print(
                f"{run.name} {method} {test}: full {result.full.ppl:.1f}, "
                + ", ".join(f"κ={r.kappa:.2f} {r.summary()['mean']:.1f}" for r in result.results)
                + f" ({time.perf_counter() - start:.0f}s)",
                flush=True,
            )
    return results


def ratios_to_best_baseline(report: dict, kappas: list[float]) -> dict:
    """run -> method -> test -> κ -> TwIST perplexity / the best baseline's (dense run, any method)."""
    dense = next(r["eval"] for r in report["runs"].values() if r["groups"] == 1)
    best = {t: {f"{k:.2f}": min(m[t][f"{k:.2f}"]["mean"] for m in dense.values()) for k in kappas} for t in TESTS}
    return {
        name: {
            method: {t: {k: by_test[t][k]["mean"] / best[t][k] for k in best[t]} for t in TESTS}
            for method, by_test in run["eval"].items()
        }
        for name, run in report["runs"].items()
        if run["groups"] > 1
    }


def report_header(budget: Budget, args: argparse.Namespace, window: int, max_windows: int) -> dict:
    """What every protocol's report states first: the budget and the evaluation protocol."""
    return {
        "token_budget": budget.tokens,
        "budget": budget.__dict__,
        "quick": args.quick,
        "window": window,
        "windows": max_windows,
        "draws": args.draws,
    }


def markdown(report: dict, kappas: list[float]) -> str:
    budget = report["budget"]
    header = (
        f"Token budget per run: {report['token_budget']:,} tokens ({budget['rounds']} rounds x {budget['local_steps']} "
        f"steps x {budget['tokens_per_step']:,} tokens), model {budget['size']}, lr {budget['lr']}. "
        f"Perplexity on {' / '.join(TESTS)} ({report['windows']} windows of {report['window']} tokens each, evenly "
        f"spaced; random: mean of {report['draws']} draws). Every layer partitioned."
    )
    return "\n".join([header, "", *tables(report, kappas)]) + "\n"


def tables(report: dict, kappas: list[float]) -> list[str]:
    """Perplexity of every run x method x κ, each TwIST export's ratio to the best baseline, parameter counts."""
    tests = list(TESTS)
    lines = [
        "| run | method | train s | full | " + " | ".join(f"κ={k:.2f}" for k in kappas) + " |",
        "| --- | --- | ---: | ---: |" + " ---: |" * len(kappas),
    ]
    for name, run in report["runs"].items():
        for method, by_test in run["eval"].items():
            full = " / ".join(f"{by_test[t]['full']['ppl']:.1f}" for t in tests)
            cells = [" / ".join(f"{by_test[t][f'{k:.2f}']['mean']:.1f}" for t in tests) for k in kappas]
            lines.append(f"| {name} | {method} | {run['train_seconds']:.0f} | {full} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Ratio to the best post-hoc baseline at the same κ (perplexity of the TwIST export / lowest perplexity "
        "of any baseline on the dense run; below 1: TwIST wins):",
        "",
        "| run | method | " + " | ".join(f"κ={k:.2f}" for k in kappas) + " |",
        "| --- | --- |" + " ---: |" * len(kappas),
    ]
    ratios = report["ratios"]
    for name, by_method in ratios.items():
        for method, cells in by_method.items():
            lines.append(
                f"| {name} | {method} | "
                + " | ".join(" / ".join(f"{cells[t][f'{k:.2f}']:.2f}" for t in tests) for k in kappas)
                + " |"
            )
    params = next(iter(next(iter(report["runs"].values()))["eval"].values()))[tests[0]]
    lines += [
        "",
        "Parameters: full "
        + f"{params['full']['params']:,}; "
        + ", ".join(f"κ={k:.2f} {params[f'{k:.2f}']['params']:,}" for k in kappas),
    ]
    return lines


def publish(report: dict, table: str, uri: str, experiment: str, out: Path, name: str) -> None:
    """bench/results/<name>.{json,md,png}; the PNG is `twist-compare`'s chart over the runs' MLflow store."""
    from twist_scale.compare import main as compare

    RESULTS.mkdir(parents=True, exist_ok=True)
    compare(["--tracking.uri", uri, "--tracking.experiment", experiment, "--out", str(out / "compare")])
    shutil.copy(out / "compare" / "ppl_vs_sparsity.png", RESULTS / f"{name}.png")
    (RESULTS / f"{name}.json").write_text(json.dumps(report, indent=2))
    (RESULTS / f"{name}.md").write_text(table)
    print(table)
    print(f"total {report['total_seconds']:.0f}s")


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
        seconds = float(done.read_text()) if args.reuse_runs and done.is_file() else train(run, out, budget, uri)
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
    protocols = ("scratch", "finetune", "ablation", "spread")
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
    args = parser.parse_args()
    if args.seed and args.protocol == "scratch":
        parser.error("--seed applies to the finetune, ablation and spread protocols, not scratch")
    if args.protocol == "finetune":
        from quality_finetune import finetune  # imports this module: the protocols share its runs and tables

        finetune(args)
    elif args.protocol == "ablation":
        from quality_ablation import ablation

        ablation(args)
    elif args.protocol == "spread":
        from quality_spread import spread

        spread(args)
    else:
        scratch(args)


if __name__ == "__main__":
    main()
