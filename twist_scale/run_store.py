"""Direct, synchronous MLflow access for short jobs outside training: evaluation and comparison.

Training goes through tracking.MLflowTracker (buffered, outage-proof); a job that runs for seconds
next to a store it has just read writes through `RunStore` instead, so this module, tracking.py and
backlog.py (the tracker's sender) are the only ones that call MLflow.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from twist_scale.tracking import experiment_id

PARENT_TAG = "mlflow.parentRunId"
Values = dict[str, Any] | None


class RunStore:
    """The runs of one tracking URI: find, create, log onto and end them."""

    def __init__(self, uri: str) -> None:
        from mlflow import MlflowClient

        self.uri, self.client = uri, MlflowClient(uri)

    def experiment(self, name: str, create: bool = True) -> str | None:
        """The id of experiment `name`; a missing one is created, or None when `create` is False."""
        return experiment_id(self.client, name, create)

    def experiment_names(self) -> list[str]:
        return [e.name for e in self.client.search_experiments()]

    def runs(self, exp_id: str) -> list[Any]:
        """Every run of the experiment (MLflow `Run`s, nested ones too), oldest first."""
        return self.client.search_runs([exp_id], max_results=50_000, order_by=["attributes.start_time ASC"])

    def experiment_of(self, run_id: str) -> str | None:
        """The experiment run `run_id` belongs to, or None when the store has no such run."""
        from mlflow.exceptions import MlflowException

        try:
            return self.client.get_run(run_id).info.experiment_id
        except MlflowException:
            return None

    def metric_keys(self, run_id: str) -> set[str]:
        """The names of the metrics run `run_id` already has."""
        return set(self.client.get_run(run_id).data.metrics)

    def create_run(self, exp_id: str, name: str, tags: dict[str, str], parent: str = "") -> str:
        """A new run, nested under run `parent` when given; it stays RUNNING until end()."""
        tags = {PARENT_TAG: parent, **tags} if parent else tags
        return self.client.create_run(exp_id, run_name=name, tags=tags).info.run_id

    def find_or_create_run(self, exp_id: str, name: str, tags: dict[str, str]) -> str:
        """The experiment's run that carries all `tags`, else a new one named `name` with them."""
        query = " AND ".join(f"tags.`{k}` = '{v}'" for k, v in tags.items())
        found = self.client.search_runs([exp_id], query, max_results=1)
        return found[0].info.run_id if found else self.create_run(exp_id, name, tags)

    def log(
        self, run_id: str, metrics: Values = None, params: Values = None, tags: Values = None, steps: Values = None
    ) -> None:
        """One batch: `metrics` at step 0, each of `steps` a list of values at steps 0, 1, ...; params, tags as str."""
        from mlflow.entities import Metric, Param, RunTag

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, 0) for k, v in (metrics or {}).items()]
        batch += [Metric(k, float(v), now, i) for k, values in (steps or {}).items() for i, v in enumerate(values)]
        self.client.log_batch(
            run_id,
            metrics=batch,
            params=[Param(k, str(v)) for k, v in (params or {}).items()],
            tags=[RunTag(k, str(v)) for k, v in (tags or {}).items()],
        )

    def log_artifact(self, run_id: str, path: str | Path) -> None:
        self.client.log_artifact(run_id, str(path))

    def end(self, run_id: str, status: str = "FINISHED") -> None:
        self.client.set_terminated(run_id, status)
