"""The MLflow tracker's backlog: records in order, the calls that send them, and their spill file.

A record is a dict: `params`, `metrics` (with step and time), `artifact` (a path read when sent) or
`end` (the run's final status). The spill file holds a header line (where the records go) and the
records not yet sent, one JSON object a line; it is appended to while the server is away and
rewritten (atomically) or removed once some were sent.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from twist_scale.atomic import atomic_write_text

if TYPE_CHECKING:
    from mlflow import MlflowClient

log = logging.getLogger(__name__)

SPILL_FILE = "mlflow_backlog.jsonl"

Record = dict[str, Any]


def refused(err: Exception) -> bool:
    """The server (or the local file system) rejected the request itself: sending it again cannot help.

    Everything else (connection refused or reset, timeouts, 5xx, rate limits, auth hiccups) is treated
    as an outage and retried later.
    """
    import requests
    from mlflow.exceptions import MlflowException

    if isinstance(err, requests.HTTPError) and err.response is not None:
        status = err.response.status_code
    elif isinstance(err, requests.RequestException):  # an OSError, but a network one
        return False
    elif isinstance(err, MlflowException):
        status = err.get_http_status_code()
    else:
        return isinstance(err, (OSError, ValueError))
    return 400 <= status < 500 and status not in (401, 403, 408, 429)


def brief(err: Exception) -> str:
    return str(err).strip().splitlines()[0][:300] if str(err).strip() else type(err).__name__


def next_call(client: MlflowClient, run_id: str, pending: list[Record]) -> tuple[int, Callable[[], object]]:
    """The call for the head of the backlog: a run of metrics and params records goes in one log_batch."""
    from mlflow.entities import Metric, Param
    from mlflow.utils.validation import MAX_ENTITIES_PER_BATCH, MAX_PARAMS_TAGS_PER_BATCH

    head = pending[0]
    if head["kind"] == "artifact":
        path, artifact_path = head["path"], head["artifact_path"]
        upload = client.log_artifacts if Path(path).is_dir() else client.log_artifact
        return 1, lambda: upload(run_id, path, artifact_path)
    if head["kind"] == "end":
        return 1, lambda: client.set_terminated(run_id, head["status"], head["time"])
    metrics: list[Metric] = []
    params: list[Param] = []
    n = 0
    for record in pending:
        if record["kind"] not in ("metrics", "params"):
            break
        size = len(record["values"])
        if n and (
            len(metrics) + len(params) + size > MAX_ENTITIES_PER_BATCH
            or (record["kind"] == "params" and len(params) + size > MAX_PARAMS_TAGS_PER_BATCH)
        ):
            break
        if record["kind"] == "metrics":
            metrics += [Metric(k, v, record["time"], record["step"]) for k, v in record["values"].items()]
        else:
            params += [Param(k, v) for k, v in record["values"].items()]
        n += 1
    return n, lambda: client.log_batch(run_id, metrics=metrics, params=params)


class SpillFile:
    """The backlog on disk, so that a crash during an outage loses nothing."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.held = 0  # how many of the backlog (a prefix) the file holds
        self.stale = path.exists()  # the file differs from the backlog beyond that prefix

    def load(self) -> list[Record]:
        """The records an earlier attempt left: the start of the backlog."""
        records = read_spill(self.path)[1]
        self.held = len(records)
        return records

    def sent(self, n: int) -> None:
        """The backlog's first n records are gone (delivered or refused)."""
        if self.held:
            self.stale = True
        self.held = max(0, self.held - n)

    def sync(self, pending: list[Record], header: Record) -> None:
        """Make the file hold exactly the backlog: append new records, rewrite once some were sent."""
        if not pending:
            if self.stale:
                self.path.unlink(missing_ok=True)
        elif self.stale:
            atomic_write_text(self.path, _lines([header, *pending]))
        elif self.held < len(pending):
            with open(self.path, "a") as f:
                f.write(_lines(([] if self.held else [header]) + pending[self.held :]))
                f.flush()
                os.fsync(f.fileno())
        self.held, self.stale = len(pending), False


def _lines(records: list[Record]) -> str:
    return "".join(json.dumps(r) + "\n" for r in records)


def read_spill(path: Path) -> tuple[Record | None, list[Record]]:
    """(header, records) of a spill file; a line torn by a crash mid-write is skipped."""
    header, records = None, []
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                log.warning("skipping a torn line in %s", path)
                continue
            if record["kind"] == "run":
                header = record
            else:
                records.append(record)
    return header, records
