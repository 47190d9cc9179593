"""Launch one short training run under the real `deepspeed` launcher and read its per-round costs.

Shared by throughput.py and scaling.py: both time whole rounds (compute vs aggregation + dispatch)
from the metrics the trainer logs to MLflow, dropping the first round (warm-up).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

from twist_scale.distributed import free_port

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
ROUND_METRICS = ("perf/tokens_per_s", "twist/compute_seconds", "twist/sync_seconds", "twist/sync_bytes")


def launch(out_dir: Path, config: str, overrides: dict[str, object], procs: int, quiet: bool = True) -> None:
    """One run under `deepspeed --num_gpus procs`; tokenizer and block cache shared beside out_dir."""
    base = {
        "out_dir": out_dir,
        "data.cache_dir": out_dir.parent / "cache",
        "data.tokenizer": out_dir.parent / "tok",
        "eval.every_rounds": 0,
        "checkpoint.every_rounds": 0,
        "twist.optimizer_state": "aggregate",
    }
    cmd = [
        str(Path(sys.executable).parent / "deepspeed"),
        "--num_gpus",
        str(procs),
        "--master_port",  # a free one: benchmarks run beside tests and other runs
        str(free_port()),
        str(REPO / "launch" / "train.py"),
        "--config",
        str(REPO / "configs" / config),
        *[f"--{k}={v}" for k, v in {**base, **overrides}.items()],
    ]
    print("$", " ".join(cmd), flush=True)
    stdout = subprocess.DEVNULL if quiet else None
    subprocess.run(cmd, cwd=REPO, env=dict(os.environ, DS_ACCELERATOR="cpu"), check=True, stdout=stdout)


def round_costs(out_dir: Path) -> dict[str, float]:
    """Mean per-round costs of a finished run (first round dropped), plus what they are per token."""
    from mlflow.tracking import MlflowClient

    from twist_scale.models import build_model
    from twist_scale.tracking import default_uri

    client = MlflowClient(tracking_uri=default_uri(out_dir))
    run_id = (out_dir / "mlflow_run_id").read_text().strip()
    series = {
        k: [m.value for m in sorted(client.get_metric_history(run_id, k), key=lambda m: m.step)][1:]
        for k in ROUND_METRICS
    }
    cfg = json.loads((out_dir / "config.json").read_text())
    model = build_model(cfg["model"]["arch"], cfg["model"]["size"], cfg["data"]["vocab_size"])
    compute, agg = statistics.mean(series["twist/compute_seconds"]), statistics.mean(series["twist/sync_seconds"])
    latest = client.get_run(run_id).data.metrics  # each metric's last value
    last = {k: latest.get(k) for k in ("perf/startup_peak_rss_mb", "twist/sync_collectives")}
    final_ppl = [v for k, v in latest.items() if k.startswith("eval/ppl_kappa")]
    return {
        "tokens_per_s": statistics.median(series["perf/tokens_per_s"]),
        "compute_s_per_round": compute,
        "agg_s_per_round": agg,
        "round_s": compute + agg,
        "agg_share": agg / (compute + agg),
        "agg_bytes_per_rank_per_round": statistics.mean(series["twist/sync_bytes"]),
        "tokens_per_rank_per_round": cfg["twist"]["local_steps"]
        * cfg["data"]["micro_batch_size"]
        * cfg["data"]["block_size"],
        "full_model_params": sum(p.numel() for p in model.parameters()),
        "collectives_per_round": last["twist/sync_collectives"],
        "startup_peak_rss_mb": last["perf/startup_peak_rss_mb"],
        "final_eval_ppl": final_ppl[0] if final_ppl else None,
    }
