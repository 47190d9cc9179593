"""No MLflow server ever answers: the tracker spills every record, and the replay CLI creates the run from them."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
from helpers import REPO, free_port
from mlflow.tracking import MlflowClient

from twist_scale import tracking
from twist_scale.config import TrackingConfig


@pytest.mark.slow  # 4 s: the replay command in a subprocess
def test_server_down_from_start_then_replay_cli(tmp_path, monkeypatch):
    """No server ever answers: the run is created by the replay CLI, from the spill file alone."""
    for name, value in tracking.FAST_FAIL_ENV.items():  # restored after the test
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(tracking, "CLOSE_WAIT_S", 0.0)
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.json").write_text("{}")
    cfg = TrackingConfig(uri=f"http://127.0.0.1:{free_port()}", experiment="outage")  # nothing listens
    start = time.monotonic()
    tracker = tracking.build_tracker(cfg, out, is_main=True)
    tracker.log_params({"seed": 3})
    for step in range(1, 6):
        tracker.log_metrics({"train/loss": 10.0 - step}, step)
    tracker.log_artifact(out / "config.json")
    tracker.close()
    assert time.monotonic() - start < 20
    assert not (out / tracking.RUN_ID_FILE).exists()
    kinds = [json.loads(line)["kind"] for line in (out / tracking.SPILL_FILE).read_text().splitlines()]
    assert kinds == ["run", "params", *["metrics"] * 5, "artifact", "end"]

    store = tracking.default_uri(tmp_path)
    subprocess.run(
        [sys.executable, str(REPO / "launch" / "replay.py"), str(out), "--tracking.uri", store],
        cwd=REPO,
        check=True,
        timeout=120,
    )
    assert not (out / tracking.SPILL_FILE).exists()
    client = MlflowClient(store)
    run = client.get_run((out / tracking.RUN_ID_FILE).read_text().strip())
    history = sorted(client.get_metric_history(run.info.run_id, "train/loss"), key=lambda m: m.timestamp)
    assert [(m.step, m.value) for m in history] == [(s, 10.0 - s) for s in range(1, 6)]
    assert run.data.params == {"seed": "3"} and run.info.status == "FINISHED" and run.info.run_name == "run"
    assert [a.path for a in client.list_artifacts(run.info.run_id)] == ["config.json"]


def test_a_resumed_run_logs_the_steps_it_repeats_once_and_ends_killed_or_finished(tmp_path):
    """Resuming from a checkpoint repeats the steps logged after it: the store keeps one value per step."""
    out = tmp_path / "run"
    out.mkdir()
    cfg = TrackingConfig(uri=tracking.default_uri(out), experiment="resume")
    first = tracking.build_tracker(cfg, out, is_main=True)
    for step in range(1, 6):  # checkpoint after step 3, stopped after step 5
        first.log_metrics({"train/loss": 10.0 - step}, step)
    first.log_metrics({"eval/ppl": 50.0}, 3)
    first.close("KILLED")
    client = MlflowClient(cfg.uri)
    run_id = (out / tracking.RUN_ID_FILE).read_text().strip()
    assert client.get_run(run_id).info.status == "KILLED"

    resumed = tracking.build_tracker(cfg, out, is_main=True)
    for step in range(4, 9):
        resumed.log_metrics({"train/loss": 10.0 - step}, step)
    resumed.log_metrics({"eval/ppl": 40.0}, 6)  # a key's own last step counts: a later eval is new
    resumed.close()
    losses = client.get_metric_history(run_id, "train/loss")
    assert sorted(m.step for m in losses) == list(range(1, 9))
    assert sorted((m.step, m.value) for m in client.get_metric_history(run_id, "eval/ppl")) == [(3, 50.0), (6, 40.0)]
    assert client.get_run(run_id).info.status == "FINISHED"
