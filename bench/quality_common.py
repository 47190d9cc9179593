"""What every quality protocol shares: the data, a run's shape and token budget, training one run under the
launcher, scoring every pruning method of a trained run, and the tables and result files.

Imports no protocol, so bench/quality.py (the equal-budget protocol and the CLI) and the fine-tuning protocols
(quality_finetune.py, quality_ablation.py, quality_spread.py) all build on it without importing each other.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from measure import REPO, RESULTS, launch

DATA = (REPO / ".." / "shared" / "data").resolve()
TRAIN = DATA / "brown" / "train.txt"
TESTS = {"brown": DATA / "brown" / "test.txt", "wikitext2": DATA / "wikitext-2" / "test.txt"}
BASELINES = ("random", "magnitude", "wanda_sp", "flap", "flap_uniform")
TWIST_METHODS = ("random", "magnitude", "adaptive_magnitude")  # zero-cost: no calibration text
STATS_METHODS = ("adaptive_stats",)  # zero-cost from the statistics a correction 'mean' run keeps
PICKED_METHODS = ("random_best",)  # TwIST's draws, the best of 8 on a few windows of the training text
QUICK_WINDOW = 64
TRAIN_SECONDS = "bench_train_seconds"


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
    run: Run, out: Path, budget: Budget, uri: str, experiment: str, extra: dict[str, object] | None = None
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
        start = time.perf_counter()
        sweeps = sweep(pruner, streams, kappas, draws, window, label=method, max_windows=max_windows)
        seconds = time.perf_counter() - start
        for result in sweeps:
            if log:
                log_sweep(result, uri, run_id)
            results.setdefault(method, {})[result.test_set] = {
                "full": {"ppl": result.full.ppl, "params": result.full_parameters, "windows": result.full.windows},
                **{
                    f"{r.kappa:.2f}": {**r.summary(), "draws": len(r.ppls), "params": r.parameters}
                    for r in result.results
                },
            }
            print(
                f"{run.name} {method} {result.test_set}: full {result.full.ppl:.1f}, "
                + ", ".join(f"κ={r.kappa:.2f} {r.summary()['mean']:.1f}" for r in result.results)
                + f" ({seconds:.0f}s for every test set)",
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
    from twist_scale.commands.compare import main as compare

    RESULTS.mkdir(parents=True, exist_ok=True)
    compare(["--tracking.uri", uri, "--tracking.experiment", experiment, "--out", str(out / "compare")])
    shutil.copy(out / "compare" / "ppl_vs_sparsity.png", RESULTS / f"{name}.png")
    (RESULTS / f"{name}.json").write_text(json.dumps(report, indent=2))
    (RESULTS / f"{name}.md").write_text(table)
    print(table)
    print(f"total {report['total_seconds']:.0f}s")
