"""Experiment tracking behind four calls; MLflow on rank 0, nothing elsewhere.

Default store: sqlite inside the run directory (no server). A requeued job continues the same
MLflow run: the run id is kept in `<out_dir>/mlflow_run_id` (or taken from MLFLOW_RUN_ID).

A tracking server can go away for a while (restart, network blip, maintenance) and training must not
notice: no tracking call raises or blocks for more than a few seconds, and no record is lost. Every
record joins an in-order backlog that is sent with `log_batch`; what the server does not take stays
in memory and in the append-only spill file `<out_dir>/mlflow_backlog.jsonl` (so a crash during an
outage loses nothing either), and is replayed in order by the next call that reaches the server and
by close(). A server that is down at start only delays creating (or resuming) the run. What a crash
or a server still down at close() leaves behind is replayed by the next attempt of the job, or by
`python launch/replay.py <out_dir>`.
Short jobs outside training (evaluation, comparison) use run_store.RunStore, unbuffered, instead.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from twist_scale.backlog import SPILL_FILE, Record, SpillFile, brief, next_call, read_spill, refused
from twist_scale.config import RunConfig, TrackingConfig, flat_params

if TYPE_CHECKING:
    from mlflow import MlflowClient

log = logging.getLogger(__name__)

RUN_ID_FILE = "mlflow_run_id"
CLOSE_WAIT_S = 60.0  # close() keeps trying this long: enough to ride out a server restart
MAX_BACKOFF_S = 30.0  # while the server is down it is tried at most this rarely (1 s, doubling, up to this)
# MLflow's HTTP client retries a dead server with exponential backoff for ~4 minutes and waits 120 s for
# an answer; the backlog makes retries unnecessary, so fail within seconds (explicit settings win).
FAST_FAIL_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "5"}


class NullTracker:
    def log_params(self, params: dict[str, Any]) -> None: ...
    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...
    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None: ...
    def close(self, status: str = "FINISHED") -> None: ...


def default_uri(out_dir: Path) -> str:
    return f"sqlite:///{(out_dir / 'mlflow.db').resolve()}"


def artifact_root(uri: str) -> str | None:
    """Keep artifacts beside a local sqlite store instead of in ./mlruns of whatever the cwd is."""
    if uri.startswith("sqlite:///"):
        return (Path(uri[len("sqlite:///") :]).parent / "mlartifacts").resolve().as_uri()
    return None


def experiment_id(client: MlflowClient, name: str, create: bool = True) -> str | None:
    """The id of experiment `name`; a missing one is created (artifacts as `artifact_root` says) or None."""
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    return client.create_experiment(name, artifact_location=artifact_root(client.tracking_uri)) if create else None


def _now_ms() -> int:
    return int(time.time() * 1000)


class MLflowTracker(NullTracker):
    """Rank 0's MLflow run. Once training is under way, no call raises or waits on a dead server.

    A failed send leaves the server alone for a growing interval, so an unreachable host costs at most
    one request timeout per interval, not one per call. Replays are safe to repeat: MLflow skips a
    metric it already holds (same key, step, timestamp and value), params may be re-logged with the
    same value, and an artifact upload overwrites itself. Artifacts are buffered by path: they are
    read when sent, so they must stay in place until then (those the trainer logs do).
    """

    def __init__(self, cfg: TrackingConfig, out_dir: Path) -> None:
        from mlflow import MlflowClient

        for name, value in FAST_FAIL_ENV.items():
            os.environ.setdefault(name, value)
        self.uri = cfg.uri or default_uri(out_dir)
        self.experiment = cfg.experiment
        self.run_name = cfg.run_name or out_dir.name
        self.out_dir = out_dir
        self.spill = SpillFile(out_dir / SPILL_FILE)
        self.client = MlflowClient(self.uri)
        id_file = out_dir / RUN_ID_FILE
        self.run_id: str | None = os.environ.get("MLFLOW_RUN_ID") or (
            id_file.read_text().strip() if id_file.exists() else None
        )
        self.resumed = self.run_id is not None
        self.logged_through: dict[str, int] = {}  # a resumed run's last logged step per metric
        self.opened = False
        self.pending: list[Record] = self.spill.load()
        self.retry_at = 0.0
        self.backoff = 1.0
        self.down_since: float | None = None
        if self.pending:
            log.info(
                "%d MLflow record(s) left by an earlier attempt in %s: replaying them", self.spill.held, self.spill.path
            )
        try:
            self._open()
        except Exception as err:
            if refused(err):  # misconfigured (unknown run id, bad URI): say so before any compute is spent
                raise
            self._failed(err)
        self._flush()

    # ------------------------------------------------------------------ the four calls
    def log_params(self, params: dict[str, Any]) -> None:
        if self.resumed:  # params are immutable in MLflow; the first attempt logged them
            return
        from mlflow.utils.validation import MAX_PARAMS_TAGS_PER_BATCH

        items = [(k, str(v)) for k, v in params.items()]
        for i in range(0, len(items), MAX_PARAMS_TAGS_PER_BATCH):
            self.pending.append({"kind": "params", "values": dict(items[i : i + MAX_PARAMS_TAGS_PER_BATCH])})
        self._flush()

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """A resumed run repeats the steps after its checkpoint: those the store holds are not logged twice."""
        from mlflow.utils.validation import MAX_METRICS_PER_BATCH

        metrics = {k: v for k, v in metrics.items() if step > self.logged_through.get(k, -1)}
        items, now = [(k, float(v)) for k, v in metrics.items()], _now_ms()
        for i in range(0, len(items), MAX_METRICS_PER_BATCH):
            chunk = dict(items[i : i + MAX_METRICS_PER_BATCH])
            self.pending.append({"kind": "metrics", "step": step, "time": now, "values": chunk})
        self._flush()

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self.pending.append({"kind": "artifact", "path": str(Path(path).resolve()), "artifact_path": artifact_path})
        self._flush()

    def close(self, status: str = "FINISHED") -> None:
        self.pending.append({"kind": "end", "status": status, "time": _now_ms()})
        if not self.drain(CLOSE_WAIT_S):
            log.warning(
                "MLflow at %s still unreachable after %.0f s: %d record(s) of run %s are kept in %s. Replay them "
                "once it answers with `python launch/replay.py %s` (a requeued job replays them too).",
                self.uri,
                CLOSE_WAIT_S,
                len(self.pending),
                self.run_id or "(not created yet)",
                self.spill.path,
                self.out_dir,
            )

    def drain(self, wait_s: float) -> bool:
        """Send the whole backlog, trying for up to wait_s seconds; True when nothing is left."""
        deadline = time.monotonic() + wait_s
        while not self._flush(force=True) and time.monotonic() < deadline:
            time.sleep(max(0.0, min(2.0, deadline - time.monotonic())))
        return not self.pending

    # ------------------------------------------------------------------ delivery
    def _open(self) -> None:
        """Create the run (and its experiment), or mark a resumed one running again."""
        if self.run_id is None:
            from mlflow.tracking.context.registry import resolve_tags

            exp_id = experiment_id(self.client, self.experiment)
            self.run_id = self.client.create_run(exp_id, tags=resolve_tags(), run_name=self.run_name).info.run_id
            (self.out_dir / RUN_ID_FILE).write_text(self.run_id)
        else:
            self.client.update_run(self.run_id, status="RUNNING")
            self.logged_through = {
                key: max(m.step for m in self.client.get_metric_history(self.run_id, key))
                for key in self.client.get_run(self.run_id).data.metrics
            }
        self.opened = True

    def _flush(self, force: bool = False) -> bool:
        """Send the backlog unless the server is resting after a failure; True when nothing is left."""
        if force or time.monotonic() >= self.retry_at:
            try:
                if not self.opened:
                    self._open()
                self._send()
            except Exception as err:
                self._failed(err)
            else:
                self._recovered()
        self.spill.sync(self.pending, self._header())
        return not self.pending

    def _send(self) -> None:
        """Deliver the backlog in order; stops at (raises) the first failure that looks like an outage."""
        while self.pending:
            n, send = next_call(self.client, self.run_id, self.pending)
            try:
                send()
            except Exception as err:
                if not refused(err):
                    raise
                log.warning("MLflow refused %d record(s), dropping them: %s", n, brief(err))
            del self.pending[:n]
            self.spill.sent(n)

    def _failed(self, err: Exception) -> None:
        self.retry_at = time.monotonic() + self.backoff
        self.backoff = min(2 * self.backoff, MAX_BACKOFF_S)
        if self.down_since is None:
            self.down_since = time.monotonic()
            log.warning(
                "MLflow at %s unreachable (%s); training goes on, records are kept in %s and replayed when it answers",
                self.uri,
                brief(err),
                self.spill.path,
            )

    def _recovered(self) -> None:
        self.backoff = 1.0
        if self.down_since is not None:
            down_s = time.monotonic() - self.down_since
            log.info("MLflow at %s answers again after %.0f s; backlog replayed", self.uri, down_s)
            self.down_since = None

    def _header(self) -> Record:
        """Where the records go: lets `replay` find the run without the training config."""
        return {"kind": "run", "uri": self.uri, "experiment": self.experiment, "run_name": self.run_name}


def build_tracker(cfg: TrackingConfig, out_dir: Path, is_main: bool) -> NullTracker:
    return MLflowTracker(cfg, out_dir) if cfg.enabled and is_main else NullTracker()


def start_run_tracking(cfg: RunConfig, out_dir: Path, is_main: bool, tokenizer_dir: Path) -> NullTracker:
    """The run's tracker, with its flattened config as params and its config and tokenizer as artifacts."""
    tracker = build_tracker(cfg.tracking, out_dir, is_main)
    tracker.log_params(flat_params(cfg))
    tracker.log_artifact(out_dir / "config.json")
    tracker.log_artifact(tokenizer_dir, "tokenizer")
    return tracker


def replay(out_dir: Path, uri: str | None = None) -> bool:
    """Send the backlog a run left in out_dir to its MLflow run (created if it never reached the server).

    True when nothing is left; the run's status changes only if the backlog ends it (close() was called).
    """
    header, _ = read_spill(out_dir / SPILL_FILE)
    if header is None:
        log.info("no MLflow backlog in %s", out_dir)
        return True
    cfg = TrackingConfig(uri=uri or header["uri"], experiment=header["experiment"], run_name=header["run_name"])
    return MLflowTracker(cfg, out_dir).drain(0)
