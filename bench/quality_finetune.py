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
import json
import shutil
import statistics
import time
from pathlib import Path

from measure import REPO
from quality import (
    DATA,
    QUICK_WINDOW,
    TESTS,
    TRAIN_SECONDS,
    Budget,
    Run,
    calibration_for,
    evaluate_run,
    publish,
    ratios_to_best_baseline,
    report_header,
    tables,
    train,
)

TUNE_TEXT = DATA / "wikitext-2" / "valid.txt"
EXPERIMENT = "bench-quality-finetune"
BASE = Run("base", "dense_brown.toml", 1, 1.0, 2, correction="none")
DENSE = Run("dense", "dense_brown.toml", 1, 1.0, 2, correction="none")
TWIST = Run("twist_k0.50_g2", "twist_brown.toml", 2, 0.5, 2)
TWIST_WALL = Run("twist_k0.50_g2_wall", "twist_brown.toml", 2, 0.5, 2)
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


def wall_rounds(rounds: int, dense_seconds: float, twist_seconds: float) -> int:
    """Rounds a TwIST run needs to train as long as the dense run did, never fewer than the equal-token run's."""
    return max(rounds, round(rounds * dense_seconds / twist_seconds))


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
    from twist_scale.pruning.methods import BEST_OF
    from twist_scale.pruning.pruner import SavedCentral, build_pruner

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
