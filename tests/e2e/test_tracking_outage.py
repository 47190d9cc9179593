"""An MLflow outage never stops training nor loses a record: failed sends are kept (memory + spill file)
and replayed in order. Real `mlflow server` processes and a real training process; no mocks.
(No server at all, then the replay CLI: unit/test_tracking_replay.py.)"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
import urllib.request
from pathlib import Path

from helpers import BIN, free_port, launch_background, stop, tiny_args
from mlflow.tracking import MlflowClient

from twist_scale import tracking

# 4k tokens a step (a round takes ~2 s here): the outage begins well before the last round.
SLOW_STEPS = dict(
    twist__rounds=6, twist__local_steps=2, parallel__engine="local", data__micro_batch_size=16, data__block_size=256
)


def start_server(store: Path, port: int) -> subprocess.Popen:
    """`mlflow server` in a session of its own: it runs a tree of processes, stopped as one group."""
    cmd = [
        str(BIN / "mlflow"),
        "server",
        "--backend-store-uri",
        tracking.default_uri(store),
        "--artifacts-destination",
        str(store / "artifacts"),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
    ]
    env = dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")  # no job-runner processes
    with open(store / "server.log", "a") as log:
        return subprocess.Popen(cmd, cwd=store, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def wait_healthy(server: subprocess.Popen, port: int, timeout: float = 90) -> None:
    deadline = time.time() + timeout
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1):
                return
        except OSError:
            assert server.poll() is None, "mlflow server exited; see server.log"
            assert time.time() < deadline, "mlflow server never answered /health"
            time.sleep(0.2)


def rounds_logged(log: Path) -> int:
    return len(re.findall(r"round \d+/\d+ loss", log.read_text()))


def test_server_killed_mid_run_then_restarted_loses_nothing(tmp_path):
    store, out, port = tmp_path / "server", tmp_path / "run", free_port()
    store.mkdir()
    uri = f"http://127.0.0.1:{port}"
    train_log = tmp_path / "train.log"
    server = start_server(store, port)
    trainer = None
    try:
        wait_healthy(server, port)
        with open(train_log, "w") as log:
            trainer = launch_background("python", 1, tiny_args(out, tracking__uri=uri, **SLOW_STEPS), output=log)
        client = MlflowClient(uri)
        deadline = time.time() + 90
        while not (
            (out / tracking.RUN_ID_FILE).exists()
            and client.get_metric_history((out / tracking.RUN_ID_FILE).read_text().strip(), "train/loss")
        ):
            assert trainer.poll() is None, train_log.read_text()[-3000:]
            assert time.time() < deadline, "no metric reached the server"
            time.sleep(0.2)
        stop(server)  # a crash: no goodbye to the client
        killed_at = rounds_logged(train_log)
        assert killed_at <= 4, "training outran the test; make its steps slower"

        deadline = time.time() + 30  # MLflow's own retries would hold the first failed call for minutes
        while rounds_logged(train_log) < killed_at + 2:
            assert trainer.poll() is None, train_log.read_text()[-3000:]
            assert time.time() < deadline, f"training stalled while MLflow was down:\n{train_log.read_text()[-2000:]}"
            time.sleep(0.2)
        spilled = [json.loads(line) for line in (out / tracking.SPILL_FILE).read_text().splitlines()]
        last_step = 2 * (killed_at + 2)  # logged after the outage began
        assert any(r["kind"] == "metrics" and r["step"] == last_step and "train/loss" in r["values"] for r in spilled)

        server = start_server(store, port)  # same port and store; up in ~15 s, training goes on meanwhile
        assert trainer.wait(timeout=120) == 0, train_log.read_text()[-3000:]
        text = train_log.read_text()
        assert "unreachable" in text and "answers again" in text
        assert not (out / tracking.SPILL_FILE).exists()

        run = client.get_run((out / tracking.RUN_ID_FILE).read_text().strip())
        steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, "train/loss"))
        assert steps == list(range(1, 13))  # every step, once
        rounds = sorted(m.step for m in client.get_metric_history(run.info.run_id, "twist/round"))
        assert rounds == list(range(2, 13, 2))
        assert run.info.status == "FINISHED"
        assert run.data.params["twist.rounds"] == "6"
        assert {a.path for a in client.list_artifacts(run.info.run_id)} == {"config.json", "tokenizer", "final"}
    finally:
        if trainer is not None:
            stop(trainer)
        stop(server)
