"""Perplexity protocol by hand, and train once → export every κ → evaluate → MLflow on the training run."""

from __future__ import annotations

import json
import math
import statistics
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import BROWN_VALID, REPO, SHAKESPEARE, launch_env
from mlflow.tracking import MlflowClient
from torch import nn

from twist_scale import evaluate
from twist_scale.data import token_stream
from twist_scale.evaluate import KappaResult, perplexity
from twist_scale.pruning.cli import main as export_main
from twist_scale.pruning.format import SUBNET_FILE, TWIST_LOADER, load_exported
from twist_scale.pruning.pruner import Central
from twist_scale.tracking import default_uri


class Bigram(nn.Module):
    """logits at t = table[token t]: a fixed model whose perplexity can be worked out by hand."""

    def __init__(self, table: torch.Tensor) -> None:
        super().__init__()
        self.table = table

    def forward(self, input_ids: torch.Tensor) -> SimpleNamespace:
        return SimpleNamespace(logits=self.table[input_ids])


@pytest.mark.parametrize("batch_size", [1, 2, 8])
def test_perplexity_matches_hand_computation(batch_size):
    table = torch.tensor([[0.0, 1.0, 2.0], [1.0, 0.0, 0.0], [0.0, 0.0, 3.0]])
    stream = torch.tensor([0, 1, 2, 2, 0, 0, 1, 2])
    # window 3: windows [0 1 2] and [2 0 0]; the tail [1 2] is dropped and no pair crosses a window boundary,
    # so the predicted pairs are 0→1, 1→2 | 2→0, 0→0.
    lse = [math.log(1 + math.e + math.e**2), math.log(math.e + 2), math.log(2 + math.e**3)]
    nll = [lse[0] - 1.0, lse[1] - 0.0, lse[2] - 0.0, lse[0] - 0.0]
    result = perplexity(Bigram(table), stream, window=3, batch_size=batch_size)
    assert result.windows == 2 and result.tokens == 4
    assert result.nll == pytest.approx(sum(nll) / 4, abs=1e-6)
    assert result.ppl == pytest.approx(math.exp(sum(nll) / 4), rel=1e-6)


def test_max_windows_scores_an_evenly_spaced_subset():
    table = torch.tensor([[0.0, 1.0, 2.0], [1.0, 0.0, 0.0], [0.0, 0.0, 3.0]])
    stream = torch.tensor([0, 1, 2, 2, 0, 0, 1, 2, 1, 1, 0, 2])  # windows of 3: [012] [200] [121] [102]
    model = Bigram(table)
    ends = perplexity(model, torch.tensor([0, 1, 2, 1, 0, 2]), window=3)  # first and last window only
    sub = perplexity(model, stream, window=3, max_windows=2)
    assert (sub.windows, sub.tokens) == (2, 4) and sub.nll == pytest.approx(ends.nll, abs=1e-12)
    assert perplexity(model, stream, window=3, max_windows=9).windows == 4  # more than exist: all of them


def test_perplexity_rejects_bad_windows():
    model = Bigram(torch.zeros(3, 3))
    with pytest.raises(ValueError, match="--window"):
        perplexity(model, torch.zeros(10, dtype=torch.long), window=1)
    with pytest.raises(ValueError, match="fewer than one window"):
        perplexity(model, torch.zeros(10, dtype=torch.long), window=11)
    with pytest.raises(ValueError, match="--max-windows"):
        perplexity(model, torch.zeros(10, dtype=torch.long), window=2, max_windows=-1)


def test_spread_over_draws():
    s = KappaResult(0.5, [10.0, 12.0, 14.0], parameters=1, plain=True).summary()
    assert s == {"mean": 12.0, "std": 2.0, "min": 10.0, "max": 14.0}


def test_cli_names_what_to_fix(tmp_path, capsys):
    for args, message in [
        (["--kappa", "1.5"], "--kappa 1.5 must be in (0, 1]"),
        (["--data", str(tmp_path / "nope.txt")], "fix --data"),
        ([], "no config.json"),
    ]:
        with pytest.raises(SystemExit):
            evaluate.main([str(tmp_path / "final"), "--data", str(BROWN_VALID), *args, "--no-mlflow"])
        assert message in capsys.readouterr().err


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> Path:
    """A seconds-long TwIST run (κ=0.5, correction 'mean') with MLflow on: its final/ is a real central model."""
    tmp = tmp_path_factory.mktemp("twist")
    train, valid = tmp / "train.txt", tmp / "valid.txt"
    train.write_text(SHAKESPEARE.read_text()[:40_000])
    valid.write_text(BROWN_VALID.read_text()[:8_000])
    out = tmp / "run"
    args = ["--config", str(REPO / "configs" / "tiny_test.toml"), "--out_dir", str(out)]
    args += ["--data.train_files", str(train), "--data.valid_files", str(valid), "--data.cache_dir", str(tmp / "cache")]
    args += ["--parallel.engine", "local", "--twist.kappa", "0.5", "--twist.allow_uncovered", "true"]
    args += ["--twist.correction", "mean", "--twist.rounds", "2", "--twist.local_steps", "2"]
    proc = subprocess.run(
        [sys.executable, str(REPO / "launch" / "train.py"), *args],
        cwd=REPO,
        env=launch_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out


def test_train_once_export_every_kappa_and_log_perplexity(trained_run, tmp_path, capsys):
    final = trained_run / "final"
    test_file = tmp_path / "test.txt"
    test_file.write_text(BROWN_VALID.read_text()[8_000:14_000])

    export_main([str(final), "--kappa", "0.5", "0.25", "--seed", "0", "1", "--out", str(tmp_path / "exports")])
    paths = [Path(p) for p in capsys.readouterr().out.split()]
    assert sorted(p.name for p in paths) == [f"random_kappa_{k}_seed{s}" for k in ("0.25", "0.50") for s in (0, 1)]
    for p in paths:  # shared layers 0, 1, 4, 5 stay whole: non-uniform widths, the one loader
        assert json.loads((p / SUBNET_FILE).read_text())["loader"] == TWIST_LOADER

    evaluate.main([str(final), "--data", str(test_file), "--kappa", "1.0", "0.5", "--draws", "2", "--window", "32"])
    capsys.readouterr()
    client = MlflowClient(default_uri(trained_run))
    run_id = (trained_run / "mlflow_run_id").read_text().strip()
    metrics = client.get_run(run_id).data.metrics
    assert metrics["test/random/ppl_kappa_1.00"] == pytest.approx(metrics["test/random/ppl_full"], rel=1e-5)
    low, mean, high = (metrics[f"test/random/ppl_kappa_0.50{s}"] for s in ("_min", "", "_max"))
    assert low < mean < high  # two different random subnets
    assert {"test/random/ppl_kappa_0.50_std", "test/random/ppl_kappa_0.50_min", "test/random/ppl_kappa_0.50_max"} <= (
        set(metrics)
    )

    children = client.search_runs(
        [client.get_run(run_id).info.experiment_id], f"tags.mlflow.parentRunId = '{run_id}' and tags.kappa = '0.50'"
    )
    assert len(children) == 1
    draws = [m.value for m in client.get_metric_history(children[0].info.run_id, "ppl")]
    assert len(draws) == 2
    assert metrics["test/random/ppl_kappa_0.50_std"] == pytest.approx(statistics.stdev(draws), rel=1e-6)

    # the file on disk is the model that was measured: draw 0 at κ=0.5 through load_exported
    stream = token_stream([str(test_file)], Central.load(final).tokenizer)
    loaded = load_exported(tmp_path / "exports" / "random_kappa_0.50_seed0")
    assert perplexity(loaded, stream, window=32).ppl == pytest.approx(draws[0], rel=1e-5)

    # a post-hoc baseline on the same model, same protocol, its own label
    evaluate.main(
        [str(final), "--data", str(test_file), "--kappa", "0.5", "--method", "magnitude", "--window", "32"]
        + ["--correction", "none", "--label", "magnitude-none"]
    )
    assert "test/magnitude-none/ppl_kappa_0.50" in client.get_run(run_id).data.metrics


def test_adaptive_stats_exports_from_the_statistics_training_kept(trained_run, tmp_path, capsys):
    """Correction 'mean' leaves running E[x] and E[x²] in the central model: enough for AL-AM, no calibration."""
    final = trained_run / "final"
    central = Central.load(final)
    stats = central.training_stats
    assert stats is not None and stats.mean.keys() == stats.sq_mean.keys() == central.means.keys()
    assert all((stats.variance(m) > 0).any() for m in stats.mean)
    export_main([str(final), "--method", "adaptive_stats", "--kappa", "0.5", "--out", str(tmp_path)])
    record = json.loads((Path(capsys.readouterr().out.split()[0]) / SUBNET_FILE).read_text())
    assert record["method"] == "adaptive_stats" and record["correction"] == "mean"
    partitioned = central.model.config.num_hidden_layers - len(central.shared_layers())
    assert len(record["kept"]) == 2 * partitioned > 0
