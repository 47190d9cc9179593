"""Train once (one in-process rank) → export every κ → evaluate → MLflow on the training run."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest
from helpers import BROWN_VALID, REPO, SHAKESPEARE
from helpers.dist import train_on_ranks
from mlflow.tracking import MlflowClient

from twist_scale.commands import evaluate
from twist_scale.commands.export import main as export_main
from twist_scale.data import token_stream
from twist_scale.evaluate import perplexity
from twist_scale.pruning.format import REMOTE_LOADER, SUBNET_FILE, load_exported
from twist_scale.pruning.pruner import SavedCentral
from twist_scale.tracking import default_uri


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
    train_on_ranks(1, args)
    return out


def test_train_once_export_every_kappa_and_log_perplexity(trained_run, tmp_path, capsys):
    final = trained_run / "final"
    test_file = tmp_path / "brown" / "test.txt"  # test set 'brown' in the metric names
    test_file.parent.mkdir()
    test_file.write_text(BROWN_VALID.read_text()[8_000:14_000])

    export_main([str(final), "--kappa", "0.5", "0.25", "--seed", "0", "1", "--out", str(tmp_path / "exports")])
    paths = [Path(p) for p in capsys.readouterr().out.split()]
    assert sorted(p.name for p in paths) == [f"random_kappa_{k}_seed{s}" for k in ("0.25", "0.50") for s in (0, 1)]
    for p in paths:  # shared layers 0, 1, 4, 5 stay whole: non-uniform widths, the one loader
        assert json.loads((p / SUBNET_FILE).read_text())["loader"] == REMOTE_LOADER

    evaluate.main([str(final), "--data", str(test_file), "--kappa", "1.0", "0.5", "--draws", "2", "--window", "32"])
    capsys.readouterr()
    client = MlflowClient(default_uri(trained_run))
    run_id = (trained_run / "mlflow_run_id").read_text().strip()
    metrics = client.get_run(run_id).data.metrics
    assert metrics["test/brown/random/ppl_kappa_1.00"] == pytest.approx(metrics["test/brown/random/ppl_full"], rel=1e-5)
    low, mean, high = (metrics[f"test/brown/random/ppl_kappa_0.50{s}"] for s in ("_min", "", "_max"))
    assert low < mean < high  # two different random subnets
    assert {
        "test/brown/random/ppl_kappa_0.50_std",
        "test/brown/random/ppl_kappa_0.50_min",
        "test/brown/random/ppl_kappa_0.50_max",
    } <= (set(metrics))

    children = client.search_runs(
        [client.get_run(run_id).info.experiment_id], f"tags.mlflow.parentRunId = '{run_id}' and tags.kappa = '0.50'"
    )
    assert len(children) == 1
    draws = [m.value for m in client.get_metric_history(children[0].info.run_id, "ppl")]
    assert len(draws) == 2
    assert metrics["test/brown/random/ppl_kappa_0.50_std"] == pytest.approx(statistics.stdev(draws), rel=1e-6)

    # the file on disk is the model that was measured: draw 0 at κ=0.5 through load_exported
    stream = token_stream([str(test_file)], SavedCentral.load(final).tokenizer)
    loaded = load_exported(tmp_path / "exports" / "random_kappa_0.50_seed0")
    assert perplexity(loaded, stream, window=32).ppl == pytest.approx(draws[0], rel=1e-5)

    # a post-hoc baseline on the same model, same protocol, its own label, on a second test set too
    held_out = tmp_path / "held_out.txt"
    held_out.write_text(BROWN_VALID.read_text()[14_000:20_000])
    evaluate.main(
        [str(final), "--data", str(test_file), "--data", str(held_out), "--kappa", "0.5", "--method", "magnitude"]
        + ["--window", "32", "--correction", "none", "--label", "magnitude-none"]
    )
    metrics = client.get_run(run_id).data.metrics
    assert {"test/brown/magnitude-none/ppl_kappa_0.50", "test/held_out/magnitude-none/ppl_kappa_0.50"} <= set(metrics)
    assert "test/brown/random/ppl_full" in metrics  # the first evaluation's keys stay


def test_adaptive_stats_exports_from_the_statistics_training_kept(trained_run, tmp_path, capsys):
    """Correction 'mean' leaves running E[x] and E[x²] in the central model: enough for AL-AM, no calibration."""
    final = trained_run / "final"
    central = SavedCentral.load(final)
    stats = central.training_stats
    assert stats is not None and stats.mean.keys() == stats.sq_mean.keys() == central.means.keys()
    assert all((stats.variance(m) > 0).any() for m in stats.mean)
    export_main([str(final), "--method", "adaptive_stats", "--kappa", "0.5", "--out", str(tmp_path)])
    record = json.loads((Path(capsys.readouterr().out.split()[0]) / SUBNET_FILE).read_text())
    assert record["method"] == "adaptive_stats" and record["correction"] == "mean"
    partitioned = central.model.config.num_hidden_layers - len(central.shared_layers())
    assert len(record["kept"]) == 2 * partitioned > 0
