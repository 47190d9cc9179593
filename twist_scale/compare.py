"""Perplexity vs sparsity across an MLflow experiment: TwIST runs and post-hoc baselines side by side.

Reads the `test/<test set>/<label>/ppl_kappa_<κ>` and `…/ppl_full` metrics that evaluate.py logs on
each training run (nested per-κ runs and earlier comparisons are skipped), prints a runs × test set ×
label table and draws the chart of sparsity_chart.py: one panel per test set, baselines dashed,
TwIST solid, the best of each stressed.
Both files are logged back as artifacts of a run named 'comparison' in the same experiment.
"""

from __future__ import annotations

import json
from pathlib import Path

from twist_scale.metric_names import MetricName
from twist_scale.run_store import PARENT_TAG, RunStore
from twist_scale.sparsity_chart import Series

KIND_TAG = "twist.kind"
COMPARISON = "comparison"


def training_of(params: dict[str, str]) -> str:
    """How the model was trained, from the params the trainer logged (twist.*)."""
    if "twist.kappa" not in params:
        return "external"
    kappa, groups = float(params["twist.kappa"]), int(params.get("twist.groups", "1"))
    mixed = json.loads(params.get("twist.group_kappas", "[]"))  # flat_params writes lists as JSON
    if not mixed and kappa == 1.0 and groups == 1:
        return "dense"
    sizes = ",".join(f"{k:g}" for k in mixed) if mixed else f"{kappa:g}"
    return f"twist κ={sizes} G={groups} {params.get('twist.correction', 'none')}"


def collect(tracking_uri: str, experiment: str) -> list[Series]:
    store = RunStore(tracking_uri)
    exp_id = store.experiment(experiment, create=False)
    if exp_id is None:
        names = ", ".join(store.experiment_names())
        raise ValueError(
            f"no experiment {experiment!r} in {tracking_uri}; --tracking.experiment is one of: {names or 'none'}"
        )
    series: list[Series] = []
    for run in store.runs(exp_id):
        tags = run.data.tags
        if PARENT_TAG in tags or tags.get(KIND_TAG) == COMPARISON:
            continue
        found: dict[tuple[str, str], Series] = {}
        for key, value in run.data.metrics.items():
            name = MetricName.parse(key)
            if name is None:
                continue
            s = found.setdefault(
                (name.test_set, name.label),
                Series(
                    run.info.run_id,
                    run.info.run_name or run.info.run_id[:8],
                    training_of(run.data.params),
                    name.test_set,
                    name.label,
                    None,
                ),
            )
            if name.kappa is None:
                s.full = value
            elif not name.stat:
                s.ppl[name.kappa] = value
            elif name.stat == "std":
                s.std[name.kappa] = value
        series += [found[k] for k in sorted(found)]
    return series


def format_table(series: list[Series]) -> str:
    """Markdown: one row per (run, test set, method), one column per κ; '±' is the std over random draws."""
    kappas = sorted({k for s in series for k in s.ppl}, reverse=True)
    header = ["run", "training", "test set", "method", "full", *(f"κ={k:.2f} ({1 - k:.0%} sparse)" for k in kappas)]
    rows = [header, ["---"] * len(header)]
    for s in series:
        cells = [f"{s.ppl[k]:.2f}" + (f" ± {s.std[k]:.2f}" if k in s.std else "") if k in s.ppl else "" for k in kappas]
        rows.append([s.run_name, s.training, s.test_set, s.label, f"{s.full:.2f}" if s.full else "", *cells])
    return "\n".join("| " + " | ".join(r) + " |" for r in rows)


def log_comparison(tracking_uri: str, experiment: str, files: list[Path]) -> str:
    """Attach the files to the experiment's 'comparison' run (created once, reused after)."""
    store = RunStore(tracking_uri)
    run_id = store.find_or_create_run(store.experiment(experiment, create=False), COMPARISON, {KIND_TAG: COMPARISON})
    for f in files:
        store.log_artifact(run_id, f)
    store.end(run_id)
    return run_id
