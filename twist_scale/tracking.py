"""Experiment tracking behind four calls; MLflow on rank 0, nothing elsewhere.

Default store: sqlite inside the run directory (no server). A requeued job continues the same
MLflow run: the run id is kept in the run directory (or taken from MLFLOW_RUN_ID).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from twist_scale.config import TrackingConfig


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


class MLflowTracker(NullTracker):
    def __init__(self, cfg: TrackingConfig, out_dir: Path) -> None:
        import mlflow

        self.mlflow = mlflow
        uri = cfg.uri or default_uri(out_dir)
        mlflow.set_tracking_uri(uri)
        experiment = mlflow.get_experiment_by_name(cfg.experiment)
        experiment_id = (
            experiment.experiment_id
            if experiment
            else mlflow.create_experiment(cfg.experiment, artifact_location=artifact_root(uri))
        )
        id_file = out_dir / "mlflow_run_id"
        run_id = os.environ.get("MLFLOW_RUN_ID") or (id_file.read_text().strip() if id_file.exists() else None)
        self.run = mlflow.start_run(
            run_id=run_id, experiment_id=experiment_id, run_name=None if run_id else (cfg.run_name or out_dir.name)
        )
        id_file.write_text(self.run.info.run_id)
        self.resumed = run_id is not None

    def log_params(self, params: dict[str, Any]) -> None:
        if self.resumed:  # params are immutable in MLflow; the first attempt logged them
            return
        items = list(params.items())
        for i in range(0, len(items), 90):
            self.mlflow.log_params(dict(items[i : i + 90]))

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self.mlflow.log_metrics({k: float(v) for k, v in metrics.items()}, step=step)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        path = Path(path)
        if path.is_dir():
            self.mlflow.log_artifacts(str(path), artifact_path)
        else:
            self.mlflow.log_artifact(str(path), artifact_path)

    def close(self, status: str = "FINISHED") -> None:
        self.mlflow.end_run(status=status)


def build_tracker(cfg: TrackingConfig, out_dir: Path, is_main: bool) -> NullTracker:
    return MLflowTracker(cfg, out_dir) if cfg.enabled and is_main else NullTracker()
