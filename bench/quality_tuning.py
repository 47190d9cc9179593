"""The setting the fine-tuning protocols share (finetune, ablation, spread): one dense base pretrained on
brown/train and cached, every run fine-tuned from it on wikitext-2/valid, each TwIST run compared with the
dense one, and the spread of random's draws against the one random_best picks.

Kept apart from the protocols so that each of them builds on it without importing another;
bench/quality_finetune.py's docstring describes the setting.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import statistics
import time
from pathlib import Path

from measure import REPO
from quality_common import (
    DATA,
    QUICK_WINDOW,
    TESTS,
    TRAIN_SECONDS,
    Budget,
    Run,
    calibration_for,
    evaluate_run,
    report_header,
    train,
)

TUNE_TEXT = DATA / "wikitext-2" / "valid.txt"
BASE = Run("base", "dense_brown.toml", 1, 1.0, 2, correction="none")
DENSE = Run("dense", "dense_brown.toml", 1, 1.0, 2, correction="none")
BASE_RECORD = "bench_base_budget.json"
SPREAD_KAPPA = 0.5


def budgets(args: argparse.Namespace) -> tuple[Budget, Budget, int, int]:
    """Base and fine-tuning budgets, evaluation window and windows scored: small Llama, or tiny for --quick."""
    lr = args.lr or 1e-3
    if args.quick:
        return Budget("tiny", 64, 512, 5, 4, 2e-3), Budget("tiny", 64, 512, 5, args.rounds or 3, lr), QUICK_WINDOW, 16
    base = Budget("small", 256, 2048, 15, 8, 2e-3)
    return base, Budget("small", 256, 2048, args.local_steps, args.rounds or 6, lr), 256, args.max_windows


def pretrained_base(root: Path, budget: Budget, retrain: bool) -> tuple[Path, float, bool]:
    """The base's Hugging Face directory, its training seconds, and whether it came from the cache.

    Pretrained once: later invocations (and the fine-tuning protocol's reruns) reuse it while its budget is the same.
    """
    run_dir, record = root / BASE.name, json.dumps(budget.__dict__, sort_keys=True)
    cached = run_dir / BASE_RECORD
    if not retrain and cached.is_file() and cached.read_text() == record and (run_dir / "final").is_dir():
        return run_dir / "final", training_seconds(run_dir), True
    if root.exists():
        shutil.rmtree(root)
    from twist_scale.tracking import default_uri

    train(BASE, root, budget, default_uri(root), experiment="bench-quality-base")
    cached.write_text(record)
    return run_dir / "final", training_seconds(run_dir), False


def tune_overrides(base: Path, seed: int) -> dict[str, object]:
    """Load the base exactly as a user loads a checkpoint, and fine-tune on the fine-tuning text.

    `seed` changes the fine-tuning's data order and subnet draws, never the base: repeats of a protocol at
    other seeds measure how much of a difference between recipes is one run's luck."""
    return {"model.pretrained": base, "data.tokenizer": base, "data.train_files": TUNE_TEXT, "seed": seed}


def training_seconds(run_dir: Path) -> float:
    """Seconds in the training loop (local steps, dispatch, aggregation) on rank 0: no launch, load or export."""
    from mlflow.tracking import MlflowClient

    from twist_scale.tracking import default_uri

    client = MlflowClient(tracking_uri=default_uri(run_dir.parent))
    run_id = (run_dir / "mlflow_run_id").read_text().strip()
    keys = ("twist/compute_seconds", "twist/sync_seconds")
    return sum(m.value for k in keys for m in client.get_metric_history(run_id, k))


def pick_summary(test_ppls: list[float], picked: int) -> dict:
    """How far apart the draws are on a test set, and how good the one random_best exports is there.

    rank 1 is the best draw on the test set; ± is half the min-max range, in % of the mean.
    """
    mean = statistics.fmean(test_ppls)
    return {
        "ppls": test_ppls,
        "min": min(test_ppls),
        "max": max(test_ppls),
        "mean": mean,
        "pm_pct": 50 * (max(test_ppls) - min(test_ppls)) / mean,
        "picked": picked,
        "picked_ppl": test_ppls[picked],
        "picked_rank": 1 + sum(p < test_ppls[picked] for p in test_ppls),
        "picked_to_mean": test_ppls[picked] / mean,
    }


def draw_spread(run_dir: Path, window: int, max_windows: int) -> dict:
    """random's draws 0..BEST_OF-1 of a TwIST run at κ=SPREAD_KAPPA, their test perplexity, and which of them
    random_best (seed 0) exports when it picks on the fine-tuning text: it scores exactly those draws."""
    from twist_scale.data import token_stream
    from twist_scale.evaluate import perplexity
    from twist_scale.pruning.pruner import SavedCentral, build_pruner
    from twist_scale.pruning.selectors import BEST_OF

    central = SavedCentral.load(run_dir / "final")
    draws = build_pruner(central, "random", shared_layers="none")
    calibration = calibration_for("random_best", TUNE_TEXT, central.tokenizer, window)
    best = build_pruner(central, "random_best", shared_layers="none", calibration=calibration)
    specs = [draws.spec(SPREAD_KAPPA, seed) for seed in range(BEST_OF)]
    picked = specs.index(best.spec(SPREAD_KAPPA, 0))
    streams = {name: token_stream([str(path)], central.tokenizer) for name, path in TESTS.items()}
    ppls: dict[str, list[float]] = {name: [] for name in TESTS}
    for seed in range(BEST_OF):
        sub, _, _ = draws.subnet(SPREAD_KAPPA, seed)
        for name, stream in streams.items():
            ppls[name].append(perplexity(sub, stream, window, max_windows=max_windows).ppl)
    return {
        "run": run_dir.name,
        "kappa": SPREAD_KAPPA,
        "draws": BEST_OF,
        **{name: pick_summary(ppls[name], picked) for name in TESTS},
    }


def base_perplexity(base: Path, window: int, max_windows: int) -> dict[str, float]:
    """The pretrained base on each test set before any fine-tuning: what fine-tuning moved."""
    from twist_scale.data import token_stream
    from twist_scale.evaluate import perplexity
    from twist_scale.pruning.pruner import SavedCentral

    central = SavedCentral.load(base)
    return {
        name: perplexity(
            central.model, token_stream([str(path)], central.tokenizer), window, max_windows=max_windows
        ).ppl
        for name, path in TESTS.items()
    }


def comparison(report: dict, kappa: float, twist: str) -> dict:
    """One TwIST run at κ against the dense run: best export / best baseline, full width / dense, per test set."""
    k, runs = f"{kappa:.2f}", report["runs"]
    dense, mine = runs[DENSE.name]["eval"], runs[twist]["eval"]
    out = {}
    for test in TESTS:
        baseline = min(dense, key=lambda m: dense[m][test][k]["mean"])
        export = min(mine, key=lambda m: mine[m][test][k]["mean"])
        some = next(iter(mine.values()))[test]["full"]["ppl"]
        out[test] = {
            "best_baseline": baseline,
            "baseline_ppl": dense[baseline][test][k]["mean"],
            "best_export": export,
            "export_ppl": mine[export][test][k]["mean"],
            "ratio": mine[export][test][k]["mean"] / dense[baseline][test][k]["mean"],
            "full_ratio": some / next(iter(dense.values()))[test]["full"]["ppl"],
        }
    return out


def spread_lines(spreads: list[dict]) -> list[str]:
    """One row per run and test set: the draws' range and what random_best picked among them."""
    first = spreads[0]
    lines = [
        f"Random draws at κ = {first['kappa']} (random's seeds 0..{first['draws'] - 1}; picked: the draw "
        "random_best exports, the lowest loss on calibration windows of wikitext-2/valid (8 of 256 tokens; quick: "
        "32 of 64); rank 1 = the best of the draws "
        "on that test set):",
        "",
        "| run | test set | min | max | mean | ± % of mean | picked draw | its perplexity | its rank | picked / mean |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for spread in spreads:
        for test in TESTS:
            p = spread[test]
            lines.append(
                f"| {spread['run']} | {test} | {p['min']:.1f} | {p['max']:.1f} | {p['mean']:.1f} | {p['pm_pct']:.1f} "
                f"| {p['picked']} | {p['picked_ppl']:.1f} | {p['picked_rank']} of {spread['draws']} "
                f"| {p['picked_to_mean']:.3f} |"
            )
    return lines


@dataclasses.dataclass(frozen=True)
class Setting:
    """What every run of a fine-tuning protocol shares: budgets, evaluation, the base, the runs' directory and store."""

    protocol: str
    base_budget: Budget
    budget: Budget
    window: int
    max_windows: int
    suffix: str  # '_quick' or '', then '_seed<N>' for a seed other than 0 and '_lr<LR>' for a given --lr
    out: Path
    uri: str
    base: Path
    start: float
    base_report: dict
    seed: int  # of every fine-tuning run (tune_overrides)

    def report(self, args: argparse.Namespace) -> dict:
        """The report's opening: protocol, base, budget and evaluation settings."""
        head = report_header(self.budget, args, self.window, self.max_windows)
        return {"protocol": self.protocol, "base": self.base_report, **head, "runs": {}}

    def entry(self, run: Run, budget: Budget, kappas: list[float], draws: int, **evaluate: object) -> dict:
        """One trained run in the report: its shape, budget, seconds and every method's evaluation."""
        return {
            "groups": run.groups,
            "kappa": run.kappa,
            "procs": run.procs,
            "rounds": budget.rounds,
            "tokens": budget.tokens,
            "train_seconds": training_seconds(self.out / run.name),
            "launch_seconds": float((self.out / run.name / TRAIN_SECONDS).read_text()),
            "eval": self.evaluate(run, kappas, draws, **evaluate),
        }

    def evaluate(self, run: Run, kappas: list[float], draws: int, **options: object) -> dict:
        return evaluate_run(run, self.out, kappas, draws, self.window, self.max_windows, self.uri, TUNE_TEXT, **options)


def variant(args: argparse.Namespace) -> str:
    """'_seed<N>' for a seed other than 0, then '_lr<LR>' for a given --lr: a repeat's runs and results never
    overwrite the protocol's own."""
    return (f"_seed{args.seed}" if args.seed else "") + (f"_lr{args.lr:g}" if args.lr else "")


def setting(args: argparse.Namespace, protocol: str) -> Setting:
    """Budgets, the cached base (pretrained if missing), and a fresh runs directory (kept with --reuse-runs)."""
    from twist_scale.tracking import default_uri

    base_budget, budget, window, max_windows = budgets(args)
    suffix = "_quick" if args.quick else ""
    seeded = variant(args)
    out = args.out or REPO / "runs" / f"bench_quality_{protocol}{suffix}{seeded}"
    print(f"configuration: base {base_budget}, fine-tuning {budget}, window {window}, max_windows {max_windows}")
    start = time.perf_counter()
    base, base_seconds, cached = pretrained_base(
        REPO / "runs" / f"bench_quality_base{suffix}", base_budget, args.retrain_base
    )
    if not args.reuse_runs and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    base_report = {
        "dir": str(base),
        "budget": base_budget.__dict__,
        "tokens": base_budget.tokens,
        "train_seconds": base_seconds,
        "cached": cached,
        "ppl": base_perplexity(base, window, max_windows),
    }
    return Setting(
        protocol,
        base_budget,
        budget,
        window,
        max_windows,
        suffix + seeded,
        out,
        default_uri(out),
        base,
        start,
        base_report,
        args.seed,
    )
