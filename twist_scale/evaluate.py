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
"""

from __future__ import annotations

import json
import logging
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from twist_scale.metric_names import LABEL, STATS, MetricName, eval_run_name
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


@torch.no_grad()
def perplexity(
    model: nn.Module, stream: torch.Tensor, window: int = 256, batch_size: int = 8, max_windows: int = 0
) -> Perplexity:
    """The protocol in the module docstring, on a 1-D stream of token ids."""
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
    windows = stream[: n * window].view(n, window)  # (windows, window)
    if 0 < max_windows < n:
        windows = windows[torch.linspace(0, n - 1, max_windows).round().long()]
        n = max_windows
    nll = mean_token_nll(model, windows.split(batch_size))
    return Perplexity(math.exp(nll), nll, n * (window - 1), n)


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
    label: str
    full: Perplexity
    full_parameters: int
    results: list[KappaResult] = field(default_factory=list)
    settings: dict = field(default_factory=dict)


def sweep(
    pruner: Pruner,
    stream: torch.Tensor,
    kappas: list[float],
    draws: int = 1,
    window: int = 256,
    batch_size: int = 8,
    label: str | None = None,
    max_windows: int = 0,
) -> Sweep:
    """Perplexity of the full model and of the method's subnet at every κ (over `draws` seeds if seeded)."""
    for kappa in kappas:
        check_kappa(kappa)
    label = label or pruner.method_name
    if not LABEL.fullmatch(label):
        raise ValueError(f"--label {label!r}: use letters, digits, '_', '-', '.' or ':' (it becomes a metric name)")
    if draws < 1:
        raise ValueError(f"--draws {draws} must be >= 1")
    model = pruner.central.model
    full = perplexity(model, stream, window, batch_size, max_windows)
    out = Sweep(
        label,
        full,
        parameter_count(model),
        settings={
            "method": pruner.method_name,
            "correction": pruner.correction,
            "shared_layers": pruner.shared_layers,
            "window": window,
            "windows": full.windows,
            "draws": draws if pruner.method.seeded else 1,
            "protocol": PROTOCOL.format(
                window=window, windows=f"{full.windows} evenly spaced windows" if max_windows else "every window"
            ),
        },
    )
    log.info("full model: ppl %.3f over %d windows", out.full.ppl, out.full.windows)
    seeds = range(draws) if pruner.method.seeded else [0]
    for kappa in kappas:
        ppls = []
        for seed in seeds:
            sub, plain, _ = pruner.subnet(kappa, seed)
            ppls.append(perplexity(sub, stream, window, batch_size, max_windows).ppl)
        result = KappaResult(kappa, ppls, parameter_count(sub), plain)
        out.results.append(result)
        s = result.summary()
        log.info("%s kappa %.2f: ppl %.3f ± %.3f [%.3f, %.3f]", out.label, kappa, *s.values())
    return out


def sweep_metrics(result: Sweep) -> dict[str, float]:
    metrics = {str(MetricName(result.label)): result.full.ppl}
    for r in result.results:
        s = r.summary()
        metrics[str(MetricName(result.label, r.kappa))] = s["mean"]
        if len(r.ppls) > 1:
            metrics |= {str(MetricName(result.label, r.kappa, k)): s[k] for k in STATS}
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
    """Summary metrics on the training run; one nested run per κ with every draw. Returns nested run ids."""
    store = RunStore(uri)
    exp_id = store.experiment_of(run_id)
    store.log(run_id, sweep_metrics(result), tags={f"test.protocol.{result.label}": result.settings["protocol"]})
    nested = []
    for r in result.results:
        name = eval_run_name(result.label, r.kappa)
        cid = store.create_run(exp_id, name, {"twist.kind": "prune-eval"}, parent=run_id)
        params = {**result.settings, "kappa": r.kappa, "parameters": r.parameters, "loads_plain": r.plain}
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
    lines = [f"full model: ppl {full.ppl:.3f} ({result.full_parameters:,} params, {full.windows} windows)"]
    lines.append(f"{'kappa':>6} {'params':>12} {'ppl mean':>10} {'std':>8} {'min':>10} {'max':>10}  draws")
    for r in result.results:
        s = r.summary()
        lines.append(
            f"{r.kappa:>6.2f} {r.parameters:>12,} {s['mean']:>10.3f} {s['std']:>8.3f} {s['min']:>10.3f} "
            f"{s['max']:>10.3f}  {len(r.ppls)}"
        )
    return "\n".join(lines)
