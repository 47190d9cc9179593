"""The distill protocol's report: per-seed ratios to the pipeline, their spread over seeds, the markdown tables.

Kept out of bench/quality_distill.py so that module holds only the protocol: what it trains and measures.
"""

from __future__ import annotations

import statistics

from quality_common import TESTS
from quality_distill_recipes import BASELINES, KAPPA, RECOVERY_SHARE

RATIOS = ("to_flap", "to_recovery", "full_to_dense")


def ratios(report: dict) -> dict:
    """Per TwIST run and test set: best export / FLAP without recovery, / FLAP + the better recovery, and full
    width / dense."""
    p = report["pipeline"]
    out = {}
    for name, run in report["twist"].items():
        out[name] = {}
        for t in TESTS:
            best = min(run["exports"], key=lambda m: run["exports"][m][t])
            recovered = min(p["recovery"]["ppl"][t], p["recovery_distill"]["ppl"][t])
            out[name][t] = {
                "best_export": best,
                "to_flap": run["exports"][best][t] / p["baselines"]["flap"][t],
                "to_recovery": run["exports"][best][t] / recovered,
                "full_to_dense": run["full_ppl"][t] / p["dense_ppl"][t],
            }
    return out


def spread(values: list[float]) -> dict:
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "min": min(values),
        "max": max(values),
        "values": values,
    }


def summary(seeds: list[dict]) -> dict:
    """Mean and spread over the seeds of every ratio and of the pipeline's perplexities."""
    runs = seeds[0]["ratios"]
    out = {
        name: {t: {k: spread([s["ratios"][name][t][k] for s in seeds]) for k in RATIOS} for t in TESTS} for name in runs
    }
    pipe = {"flap": lambda p, t: p["baselines"]["flap"][t], "dense": lambda p, t: p["dense_ppl"][t]}
    pipe |= {k: (lambda p, t, k=k: p[k]["ppl"][t]) for k in ("recovery", "recovery_distill")}
    pipe |= {"best_other": lambda p, t: min(p["baselines"][m][t] for m in BASELINES if m != "flap")}
    out["pipeline"] = {k: {t: spread([f(s["pipeline"], t) for s in seeds]) for t in TESTS} for k, f in pipe.items()}
    return out


def markdown(report: dict) -> str:
    s, seeds = report["summary"], report["seeds"]
    first = seeds[0]
    p = first["pipeline"]
    lines = [
        f"κ = {KAPPA}, fine-tuning protocol ({report['budget']['size']} Llama from the cached base, wikitext-2/valid), "
        f"seeds {', '.join(str(x['seed']) for x in seeds)}; perplexity on {' / '.join(TESTS)}. Compute: dense "
        f"fine-tune {report['budget_tokens']:,} tokens + recovery {int(RECOVERY_SHARE * report['budget_tokens']):,} "
        f"= {p['flops']:.3g} FLOPs (every cell but `independent_tokens` at this compute; matmul weights: dense "
        f"{p['weights']['dense']:,}, FLAP κ={KAPPA} {p['weights']['flap']:,}).",
        "",
        "Pipeline (mean ± std over seeds):",
        "",
        "| model | " + " | ".join(TESTS) + " |",
        "| --- |" + " ---: |" * len(TESTS),
    ]
    for key, label in (
        ("dense", "dense fine-tune (full width)"),
        ("flap", f"FLAP κ={KAPPA}, no recovery"),
        ("best_other", "best other post-hoc (random/magnitude/wanda_sp)"),
        ("recovery", "FLAP + recovery fine-tune"),
        ("recovery_distill", "FLAP + distilled recovery"),
    ):
        cells = s["pipeline"][key]
        lines.append(f"| {label} | " + " | ".join(f"{cells[t]['mean']:.1f} ± {cells[t]['std']:.1f}" for t in TESTS))
    lines += [
        "",
        "TwIST (best zero-cost export at κ = 0.5 per test set; mean ± std of the ratio over seeds; below 1: TwIST "
        "wins; targets: ≤ 0.70 to FLAP, ≤ 1.00 to pruning + recovery, full width ≤ 1.02 to dense):",
        "",
        "| recipe | rounds | tokens | compute / pipeline | test set | export / FLAP | export / FLAP + recovery "
        "| full width / dense | best export (seed 0) |",
        "| --- | ---: | ---: | ---: | --- | ---: | ---: | ---: | --- |",
    ]
    for name, by_test in s.items():
        if name == "pipeline":
            continue
        run = first["twist"][name]
        for t in TESTS:
            c = by_test[t]
            lines.append(
                f"| {name} | {run['rounds']} | {run['tokens']:,} | {run['flops'] / p['flops']:.2f} | {t} | "
                + " | ".join(f"{c[k]['mean']:.3f} ± {c[k]['std']:.3f}" for k in RATIOS)
                + f" | {first['ratios'][name][t]['best_export']} |"
            )
    lines += ["", f"Total {report['total_seconds'] / 60:.0f} min."]
    return "\n".join(lines) + "\n"
