"""Spread: how far apart TwIST's random κ=0.5 draws are, run by run, and how good random_best's pick is.

    python bench/quality.py --protocol spread            # the ablation's runs: ~7 min on 2 cores
    python bench/quality.py --protocol spread --quick    # the quick ablation's runs: ~2 min
    python bench/quality.py --protocol spread --seed 1   # the runs of `--protocol ablation --seed 1` (also --lr)

Trains nothing: it reads every TwIST run of the ablation (bench/quality_ablation.py, run first; --out picks
another runs directory) that has groups at κ=0.5, draws random's seeds 0..7 at κ=0.5 pruning every layer,
and scores each draw on both test sets with the fine-tuning protocol's settings. random_best, seed 0,
scores exactly those 8 draws on calibration windows of wikitext-2/valid (the fine-tuning text) and exports
the lowest: the report says which draw that was, its rank among the 8 on each test set, and its
perplexity over the draws' mean. Many runs, one base: whether the pick is reliable, not lucky once.
Writes bench/results/quality_spread{,_quick}{,_seed<N>}{,_lr<LR>}.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

from measure import REPO, RESULTS
from quality_common import QUICK_WINDOW, TESTS
from quality_tuning import SPREAD_KAPPA, draw_spread, spread_lines, variant


def trained_at_kappa(meta: dict) -> bool:
    """A TwIST run with a group at SPREAD_KAPPA (older runs record one `kappa` for every group)."""
    kappas = meta.get("kappas") or [meta["kappa"]] * meta["groups"]
    return meta["groups"] > 1 and any(abs(k - SPREAD_KAPPA) < 1e-9 for k in kappas)


def summary(spreads: list[dict]) -> dict:
    """Per test set, over the runs: the mean ± of the draws, and how often the pick was the best or second best."""
    out = {}
    for test in TESTS:
        cells = [s[test] for s in spreads]
        out[test] = {
            "mean_pm_pct": statistics.fmean(c["pm_pct"] for c in cells),
            "mean_picked_to_mean": statistics.fmean(c["picked_to_mean"] for c in cells),
            "picked_best": sum(c["picked_rank"] == 1 for c in cells),
            "picked_top2": sum(c["picked_rank"] <= 2 for c in cells),
            "runs": len(cells),
        }
    return out


def markdown(report: dict) -> str:
    lines = [
        f"Runs of {report['runs_dir']}; perplexity on {' / '.join(TESTS)} ({report['windows']} windows of "
        f"{report['window']} tokens each, evenly spaced). Every layer pruned.",
        "",
        "| test set | runs | mean ± % of the draws | picked = best draw | picked in the best 2 | picked / mean |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for test, s in report["summary"].items():
        lines.append(
            f"| {test} | {s['runs']} | {s['mean_pm_pct']:.1f} | {s['picked_best']} | {s['picked_top2']} "
            f"| {s['mean_picked_to_mean']:.3f} |"
        )
    return "\n".join([*lines, "", *spread_lines(report["spreads"])]) + "\n"


def spread(args: argparse.Namespace) -> None:
    suffix = ("_quick" if args.quick else "") + variant(args)
    runs_dir = args.out or REPO / "runs" / f"bench_quality_ablation{suffix}"
    window, max_windows = (QUICK_WINDOW, 16) if args.quick else (256, args.max_windows)
    runs = sorted(
        d
        for d in runs_dir.glob("*/final")
        if (d / "twist.json").is_file() and trained_at_kappa(json.loads((d / "twist.json").read_text()))
    )
    if not runs:
        raise SystemExit(
            f"no TwIST run at κ={SPREAD_KAPPA} in {runs_dir}: run `python bench/quality.py --protocol ablation` with "
            "the same --quick, --seed and --lr first, or pass --out with a runs directory that has them"
        )
    start = time.perf_counter()
    spreads = []
    for final in runs:
        spreads.append(draw_spread(final.parent, window, max_windows))
        print(spread_lines(spreads[-1:])[-2:], flush=True)
    report = {
        "runs_dir": str(runs_dir.relative_to(REPO)) if runs_dir.is_relative_to(REPO) else str(runs_dir),
        "window": window,
        "windows": max_windows,
        "spreads": spreads,
        "summary": summary(spreads),
        "total_seconds": time.perf_counter() - start,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    name = f"quality_spread{suffix}"
    (RESULTS / f"{name}.json").write_text(json.dumps(report, indent=2))
    table = markdown(report)
    (RESULTS / f"{name}.md").write_text(table)
    print(table)
    print(f"total {report['total_seconds']:.0f}s")
