"""Training throughput of TwIST against dense data parallelism on the same processes.

    python bench/throughput.py            # small Llama (~17M), brown, 2 processes, 3 rounds of 15 steps
    python bench/throughput.py --quick    # tiny Llama, seconds

Runs, one after another under the real `deepspeed` launcher on the same 2 processes: dense data
parallel (1 group x 2 ranks) and TwIST kappa=0.5 with 2 groups x 1 rank (paper-style shared layers,
and every layer partitioned). Reads the per-round metrics each run logged to MLflow and writes
bench/results/throughput.{json,md}. The first round includes warm-up and is dropped. The machine
is noisy: read the ratios, not the absolute numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = (REPO / ".." / "shared" / "data").resolve()
RESULTS = REPO / "bench" / "results"

VARIANTS = {
    "dense DP (1x2)": {"twist.groups": 1, "twist.kappa": 1.0},
    "TwIST k=0.5 (2x1), shared 0,1,4,5": {"twist.groups": 2, "twist.kappa": 0.5},
    "TwIST k=0.5 (2x1), all layers partitioned": {"twist.groups": 2, "twist.kappa": 0.5, "twist.shared_layers": ""},
}


def run(out_dir: Path, overrides: dict[str, object], quick: bool) -> dict[str, float]:
    base = {
        "out_dir": out_dir,
        "data.cache_dir": out_dir.parent / "cache",
        "data.tokenizer": out_dir.parent / "tok",
        "twist.rounds": 3,
        "twist.local_steps": 15 if not quick else 4,
        "eval.every_rounds": 0,
        "checkpoint.every_rounds": 0,
        "twist.optimizer_state": "aggregate",
    }
    config = REPO / "configs" / ("tiny_test.toml" if quick else "twist_brown.toml")
    args = [f"--{k}={v}" for k, v in {**base, **overrides}.items()]
    cmd = [
        str(Path(sys.executable).parent / "deepspeed"),
        "--num_gpus",
        "2",
        str(REPO / "launch" / "train.py"),
        "--config",
        str(config),
        *args,
    ]
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, cwd=REPO, env=dict(os.environ, DS_ACCELERATOR="cpu"), check=True, stdout=subprocess.DEVNULL)
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{out_dir / 'mlflow.db'}")
    run_id = (out_dir / "mlflow_run_id").read_text().strip()
    series = {
        k: [m.value for m in sorted(client.get_metric_history(run_id, k), key=lambda m: m.step)][1:]
        for k in ("perf/tokens_per_s", "twist/compute_seconds", "twist/agg_seconds", "twist/agg_bytes")
    }
    cfg = json.loads((out_dir / "config.json").read_text())
    tokens_per_round = cfg["twist"]["local_steps"] * cfg["data"]["micro_batch_size"] * cfg["data"]["block_size"] * 2
    compute, agg = statistics.mean(series["twist/compute_seconds"]), statistics.mean(series["twist/agg_seconds"])
    params = sum(p.numel() for p in _model(cfg).parameters())
    dense_bytes_per_step = 2 * params * 4 * (2 - 1) / 2  # ring all-reduce of fp32 gradients, 2 ranks, per rank
    return {
        "tokens_per_s": statistics.median(series["perf/tokens_per_s"]),
        "compute_s_per_round": compute,
        "agg_s_per_round": agg,
        "agg_share": agg / (compute + agg),
        "bytes_per_token_per_rank": (
            statistics.mean(series["twist/agg_bytes"]) / (tokens_per_round / 2)
            if cfg["twist"]["groups"] > 1
            else dense_bytes_per_step / (cfg["data"]["micro_batch_size"] * cfg["data"]["block_size"])
        ),
        "full_model_params": params,
    }


def _model(cfg: dict):  # noqa: ANN202
    from twist_scale.models import build_model

    return build_model(cfg["model"]["arch"], cfg["model"]["size"], cfg["data"]["vocab_size"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny model, a few steps")
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, overrides) in enumerate(VARIANTS.items()):
            results[name] = run(Path(tmp) / f"run{i}", overrides, args.quick)
            print(name, json.dumps(results[name]), flush=True)
    dense = results["dense DP (1x2)"]["tokens_per_s"]
    for r in results.values():
        r["speed_vs_dense"] = r["tokens_per_s"] / dense
    RESULTS.mkdir(parents=True, exist_ok=True)
    suffix = "_quick" if args.quick else ""
    (RESULTS / f"throughput{suffix}.json").write_text(json.dumps({"quick": args.quick, "runs": results}, indent=2))
    lines = [
        "| run | tokens/s | × dense | compute s/round | agg+dispatch s/round | agg share | bytes/token/rank |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, r in results.items():
        lines.append(
            f"| {name} | {r['tokens_per_s']:.0f} | {r['speed_vs_dense']:.2f} | {r['compute_s_per_round']:.2f} | "
            f"{r['agg_s_per_round']:.2f} | {r['agg_share']:.1%} | {r['bytes_per_token_per_rank']:.0f} |"
        )
    (RESULTS / f"throughput{suffix}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
