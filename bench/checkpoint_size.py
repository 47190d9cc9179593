"""Bytes per checkpoint of `make train`'s run (configs/twist_brown.toml, 2 ranks, G = 2, κ = 0.5, moments
aggregated) and of its dense twin, split into rank files (central shards, data and RNG state) and
engine files (weights and moments an engine saves itself).

`--repo OTHER_CHECKOUT` measures another checkout with the same launcher and data, so the before and
after of a change are measured in one run: `python bench/checkpoint_size.py --repo /tmp/old`.
Writes bench/results/checkpoint_size.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from measure import REPO, RESULTS

from twist_scale.distributed import free_port

RUNS = {"twist": "twist_brown.toml", "dense": "dense_brown.toml"}
DATA = (REPO / ".." / "shared" / "data").resolve()


def train_one_round(repo: Path, config: str, out_dir: Path) -> None:
    cmd = [
        str(Path(sys.executable).parent / "deepspeed"),
        "--num_gpus",
        "2",
        "--master_port",  # a free one: benchmarks run beside tests and other runs
        str(free_port()),
        str(repo / "launch" / "train.py"),
        "--config",
        str(repo / "configs" / config),
        f"--out_dir={out_dir}",
        "--twist.rounds=1",
        "--twist.local_steps=1",
        "--eval.max_batches=1",
        f"--data.cache_dir={out_dir.parent / 'cache'}",
        f"--data.tokenizer={out_dir.parent / 'tok'}",
        f"--data.root={DATA}",
    ]
    print("$", " ".join(cmd), flush=True)
    env = dict(os.environ, DS_ACCELERATOR="cpu", PYTHONPATH=str(repo))
    subprocess.run(cmd, cwd=repo, env=env, check=True, stdout=subprocess.DEVNULL)


def sizes(checkpoint: Path) -> dict[str, int]:
    files = [p for p in checkpoint.rglob("*") if p.is_file()]
    ranks = sum(p.stat().st_size for p in files if p.name.startswith("rank_"))
    engines = sum(p.stat().st_size for p in files if "group_" in str(p.relative_to(checkpoint)))
    return {"rank_files": ranks, "engine_files": engines, "total": sum(p.stat().st_size for p in files)}


def measure(repo: Path, work: Path) -> dict[str, dict[str, int]]:
    out = {}
    for name, config in RUNS.items():
        run = work / name
        train_one_round(repo, config, run)
        (checkpoint,) = sorted((run / "checkpoints").glob("round_*"))
        out[name] = sizes(checkpoint)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repo", type=Path, help="also measure this checkout (e.g. the code before a change)")
    args = parser.parse_args()
    results = {}
    with tempfile.TemporaryDirectory(prefix="ckpt-size-") as tmp:
        for label, repo in (("before", args.repo), ("now", REPO)):
            if repo is not None:
                results[label] = measure(repo.resolve(), Path(tmp) / label)
    lines = [
        "| checkout | run | rank files (MB) | engine files (MB) | checkpoint (MB) |",
        "| --- | --- | ---: | ---: | ---: |",
    ]
    for label, runs in results.items():
        for run, s in runs.items():
            mb = {k: f"{v / 1e6:,.1f}" for k, v in s.items()}
            lines.append(f"| {label} | {run} | {mb['rank_files']} | {mb['engine_files']} | {mb['total']} |")
    table = "\n".join(lines)
    print(table)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "checkpoint_size.json").write_text(json.dumps(results, indent=2))
    (RESULTS / "checkpoint_size.md").write_text(
        "Bytes per checkpoint, `python bench/checkpoint_size.py"
        + (" --repo OLD" if args.repo else "")
        + "` (configs/twist_brown.toml and dense_brown.toml, 2 ranks, one round)\n\n"
        + table
        + "\n"
    )


if __name__ == "__main__":
    main()
