"""Held-out perplexity of the full model and of its κ-subnets, with the pruning papers' protocol.

Protocol (as in wanda / SparseGPT / FLAP, fixed so every method is measured the same way):
the test split's documents (non-empty lines of a .txt) are tokenized without special tokens and
joined into one stream, each followed by the tokenizer's EOS — exactly how training packs its
blocks. The stream is cut into non-overlapping windows of `window` tokens (default 256, our
models' training context); the tail shorter than a window is dropped. Each window is scored on
its own (no carried-over context): every token but the first is predicted, and
perplexity = exp(mean NLL over all predicted tokens), i.e. windows × (window − 1) of them.
`max_windows` (0 = all) scores an evenly spaced subset of those windows instead, so a long split
can be sampled across its whole length on a slow machine; the count scored is always reported.

Subnets are built in memory by the same code that writes exports (`build_subnet`); tests prove a
saved-and-loaded export gives the same logits. A seeded method (random) is measured over several
draws: the spread (mean, std, min, max) is the "golden ticket" claim, measured.

Scoring is the whole cost, so nothing is scored twice: κ = 1 keeps every unit whatever the method or
draw, so its subnet is the full model and the full model's score serves it; each (κ, draw) subnet
is built once and scored on every test set.
"""

from __future__ import annotations

import json
import logging
import math
import statistics
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from twist_scale.metric_names import STATS, MetricName, check_name, eval_run_name, metric_prefix
from twist_scale.pruning.build import parameter_count
from twist_scale.pruning.calibration import mean_token_nll
from twist_scale.pruning.methods import check_kappa
from twist_scale.pruning.pruner import Pruner
from twist_scale.run_store import RunStore
from twist_scale.tracking import RUN_ID_FILE, default_uri

log = logging.getLogger(__name__)

DEFAULT_KAPPAS = (1.0, 0.75, 0.5, 0.25)
PROTOCOL = (
    "documents joined by EOS; non-overlapping windows of {window} tokens, tail dropped; {windows}; exp(mean token NLL)"
)


@dataclass(frozen=True)
class Perplexity:
    ppl: float
    nll: float  # mean NLL per predicted token, nats
    tokens: int  # predicted tokens: windows * (window - 1)
    windows: int


def windows_of(stream: torch.Tensor, window: int = 256, max_windows: int = 0) -> torch.Tensor:
    """(windows, window) token ids: the stream cut as the module docstring says, subsampled if asked."""
    if window < 2:
        raise ValueError(f"--window {window} must be >= 2 (a window predicts window - 1 tokens)")
    if max_windows < 0:
        raise ValueError(f"--max_windows {max_windows} must be >= 0 (0 scores every window)")
    n = stream.numel() // window
    if n == 0:
        raise ValueError(
            f"the test text has {stream.numel()} tokens, fewer than one window of {window}; "
            "use a smaller --window or more text"
        )
    windows = stream[: n * window].view(n, window)
    if 0 < max_windows < n:
        windows = windows[torch.linspace(0, n - 1, max_windows).round().long()]
    return windows


@torch.no_grad()
def score(model: nn.Module, windows: torch.Tensor, batch_size: int = 8, bar: tqdm | None = None) -> Perplexity:
    """Perplexity over the windows, `batch_size` at a time; `bar` advances by each batch once it is scored."""
    batches = windows.split(batch_size)
    nll = mean_token_nll(model, batches if bar is None else _advancing(batches, bar))
    n, window = windows.shape
    return Perplexity(math.exp(nll), nll, n * (window - 1), n)


def _advancing(batches: Iterable[torch.Tensor], bar: tqdm) -> Iterator[torch.Tensor]:
    for batch in batches:
        yield batch
        bar.update(len(batch))


def perplexity(
    model: nn.Module, stream: torch.Tensor, window: int = 256, batch_size: int = 8, max_windows: int = 0
) -> Perplexity:
    """The protocol in the module docstring, on a 1-D stream of token ids."""
    return score(model, windows_of(stream, window, max_windows), batch_size)


@dataclass
class KappaResult:
    kappa: float
    ppls: list[float]  # one per draw
    parameters: int
    plain: bool  # loads with plain from_pretrained once exported

    def summary(self) -> dict[str, float]:
        std = statistics.stdev(self.ppls) if len(self.ppls) > 1 else 0.0
        return {"mean": statistics.fmean(self.ppls), "std": std, "min": min(self.ppls), "max": max(self.ppls)}


@dataclass
class Sweep:
    """One label's results on one test set."""

    test_set: str
    label: str
    full: Perplexity
    full_parameters: int
    results: list[KappaResult] = field(default_factory=list)
    settings: dict = field(default_factory=dict)


def sweep(
    pruner: Pruner,
    streams: dict[str, torch.Tensor],
    kappas: list[float],
    draws: int = 1,
    window: int = 256,
    batch_size: int = 8,
    label: str | None = None,
    max_windows: int = 0,
) -> list[Sweep]:
    """Perplexity of the full model and of the method's subnet at every κ (over `draws` seeds if seeded), on
    every test set (name -> token stream): one Sweep per test set, in the streams' order."""
    kappas = list(dict.fromkeys(kappas))
    for kappa in kappas:
        check_kappa(kappa)
    label = label or pruner.method_name
    check_name("--label", label)
    for name in streams:
        check_name("--test_set", name)
    if draws < 1:
        raise ValueError(f"--draws {draws} must be >= 1")
    tests = {}
    for name, stream in streams.items():
        try:
            tests[name] = windows_of(stream, window, max_windows)
        except ValueError as err:
            raise ValueError(f"test set {name}: {err}") from None
    seeds = range(draws) if pruner.method.seeded else range(1)
    full, ppls, built = _score_all(pruner, tests, [k for k in kappas if k < 1.0], seeds, batch_size, label)
    full_parameters = parameter_count(pruner.central.model)
    sweeps = []
    for name, f in full.items():
        results = [
            KappaResult(k, ppls[name][k], *built[k])
            if k < 1.0
            else KappaResult(k, [f.ppl], full_parameters, plain=True)  # the full model; its config states its widths
            for k in kappas
        ]
        protocol = PROTOCOL.format(
            window=window, windows=f"{f.windows} evenly spaced windows" if max_windows else "every window"
        )
        settings = {
            "method": pruner.method_name,
            "correction": pruner.correction,
            "shared_layers": pruner.shared_layers,
            "window": window,
            "windows": f.windows,
            "draws": len(seeds),
            "protocol": protocol,
        }
        sweeps.append(Sweep(name, label, f, full_parameters, results, settings))
    return sweeps


def _score_all(
    pruner: Pruner,
    tests: dict[str, torch.Tensor],
    pruned: list[float],
    seeds: range,
    batch_size: int,
    label: str,
) -> tuple[dict[str, Perplexity], dict[str, dict[float, list[float]]], dict[float, tuple[int, bool]]]:
    """The full model, then each (κ, seed) subnet, built once and scored on every test set, under one progress
    bar: (test set -> full model, test set -> κ -> ppl per draw, κ -> (parameters, loads plain))."""
    models, windows = 1 + len(pruned) * len(seeds), sum(len(w) for w in tests.values())
    log.info(
        "scoring %d models x %d windows: the full one, then %d draw(s) at kappa %s; windows per test set: %s",
        models,
        windows,
        len(seeds),
        ", ".join(f"{k:g}" for k in pruned) or "none below 1",
        ", ".join(f"{name} {len(w)}" for name, w in tests.items()),
    )
    ppls: dict[str, dict[float, list[float]]] = {name: {} for name in tests}
    built: dict[float, tuple[int, bool]] = {}
    with logging_redirect_tqdm(), tqdm(total=models * windows, unit="window", desc="full model") as bar:
        full = {name: score(pruner.central.model, w, batch_size, bar) for name, w in tests.items()}
        for name, f in full.items():
            log.info("%s full model: ppl %.3f over %d windows", name, f.ppl, f.windows)
        for kappa in pruned:
            for seed in seeds:
                bar.set_description(f"kappa {kappa:.2f}" + (f" draw {seed + 1}/{len(seeds)}" if len(seeds) > 1 else ""))
                sub, plain, _ = pruner.subnet(kappa, seed)
                for name, w in tests.items():
                    ppls[name].setdefault(kappa, []).append(score(sub, w, batch_size, bar).ppl)
            built[kappa] = parameter_count(sub), plain
            for name in tests:
                s = KappaResult(kappa, ppls[name][kappa], *built[kappa]).summary()
                log.info("%s %s kappa %.2f: ppl %.3f ± %.3f [%.3f, %.3f]", name, label, kappa, *s.values())
    return full, ppls, built


def sweep_metrics(result: Sweep) -> dict[str, float]:
    test_set, label = result.test_set, result.label
    metrics = {str(MetricName(test_set, label)): result.full.ppl}
    for r in result.results:
        s = r.summary()
        metrics[str(MetricName(test_set, label, r.kappa))] = s["mean"]
        if len(r.ppls) > 1:
            metrics |= {str(MetricName(test_set, label, r.kappa, k)): s[k] for k in STATS}
    return metrics


def resolve_run(central_dir: Path, uri: str, run_id: str, experiment: str) -> tuple[str, str]:
    """The training run to log onto: given, or <run>/mlflow_run_id in <run>/mlflow.db; else a new run."""
    out_dir = central_dir.resolve().parent
    uri = uri or default_uri(out_dir)
    store = RunStore(uri)
    id_file = out_dir / RUN_ID_FILE
    run_id = run_id or (id_file.read_text().strip() if id_file.is_file() else "")
    if run_id:
        if store.experiment_of(run_id) is None:
            raise ValueError(
                f"MLflow run {run_id} is not in {uri}; pass the store training logged to (--tracking.uri, "
                f"its --tracking.uri) or --run_id"
            )
        return uri, run_id
    run_id = store.create_run(store.experiment(experiment), out_dir.name, {"twist.kind": "evaluated-model"})
    store.end(run_id)
    return uri, run_id


def log_sweep(result: Sweep, uri: str, run_id: str) -> list[str]:
    """Summary metrics on the training run; one nested run per κ with every draw. Returns nested run ids.

    Metrics of the same label and test set already on the run are replaced (MLflow shows the latest),
    which is said in one line, since a variant meant to sit beside them wants its own --label.
    """
    store = RunStore(uri)
    exp_id = store.experiment_of(run_id)
    prefix = metric_prefix(result.test_set, result.label)
    if any(key.startswith(prefix) for key in store.metric_keys(run_id)):
        log.warning("run %s already has %s* metrics: this evaluation replaces them", run_id, prefix)
    tag = f"test.protocol.{result.test_set}/{result.label}"
    store.log(run_id, sweep_metrics(result), tags={tag: result.settings["protocol"]})
    nested = []
    for r in result.results:
        name = eval_run_name(result.test_set, result.label, r.kappa)
        cid = store.create_run(exp_id, name, {"twist.kind": "prune-eval"}, parent=run_id)
        params = {
            **result.settings,
            "test_set": result.test_set,
            "kappa": r.kappa,
            "parameters": r.parameters,
            "loads_plain": r.plain,
        }
        metrics = {f"ppl_{k}": v for k, v in r.summary().items()}
        metrics |= {"parameters": r.parameters, "ppl_full": result.full.ppl}
        store.log(
            cid,
            metrics,
            params={k: json.dumps(v) if isinstance(v, list) else v for k, v in params.items()},
            tags={"kappa": f"{r.kappa:.2f}"},
            steps={"ppl": r.ppls},
        )
        store.end(cid)
        nested.append(cid)
    return nested


def format_sweep(result: Sweep) -> str:
    full = result.full
    lines = [
        f"{result.test_set}: full model ppl {full.ppl:.3f} ({result.full_parameters:,} params, {full.windows} windows)"
    ]
    lines.append(f"{'kappa':>6} {'params':>12} {'ppl mean':>10} {'std':>8} {'min':>10} {'max':>10}  draws")
    for r in result.results:
        s = r.summary()
        lines.append(
            f"{r.kappa:>6.2f} {r.parameters:>12,} {s['mean']:>10.3f} {s['std']:>8.3f} {s['min']:>10.3f} "
            f"{s['max']:>10.3f}  {len(r.ppls)}"
        )
    return "\n".join(lines)
