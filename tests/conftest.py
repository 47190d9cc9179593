"""Shared helpers: tiny configs on the sample corpora and real multi-process launches."""

from __future__ import annotations

import functools
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DATA = (REPO / ".." / "shared" / "data").resolve()
SHAKESPEARE = DATA / "tinyshakespeare" / "input.txt"
BROWN_VALID = DATA / "brown" / "valid.txt"
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@functools.cache
def _empty_mlflow_store() -> Path:
    """An MLflow sqlite store with its schema already migrated (a fresh one costs seconds per run)."""
    import mlflow

    path = Path(tempfile.mkdtemp(prefix="twist-mlflow-")) / "mlflow.db"
    mlflow.MlflowClient(tracking_uri=f"sqlite:///{path}").search_experiments()
    return path


def tiny_args(out_dir: Path, **overrides: object) -> list[str]:
    """CLI args for a seconds-long run of the tiny Llama on Tiny Shakespeare."""
    out_dir.mkdir(parents=True, exist_ok=True)
    if not (out_dir / "mlflow.db").exists():
        shutil.copy(_empty_mlflow_store(), out_dir / "mlflow.db")
    args = [
        "--config",
        str(REPO / "configs" / "tiny_test.toml"),
        "--out_dir",
        str(out_dir),
        "--data.train_files",
        str(SHAKESPEARE),
        "--data.valid_files",
        str(BROWN_VALID),
        "--data.cache_dir",
        str(out_dir.parent / "cache"),
    ]
    for key, value in overrides.items():
        args += [f"--{key.replace('__', '.')}", str(value)]
    return args


def launch_env() -> dict[str, str]:
    env = dict(os.environ, DS_ACCELERATOR="cpu", PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    env["PATH"] = f"{BIN}:{env['PATH']}"
    return env


def run_deepspeed(
    nproc: int, script: str | Path, args: list[str], timeout: float = 300, check: bool = True
) -> subprocess.CompletedProcess:
    """A real `deepspeed --num_gpus N` launch on 127.0.0.1 with gloo; a clean run leaves no shared memory."""
    port = free_port()
    cmd = [str(BIN / "deepspeed"), "--num_gpus", str(nproc), "--master_port", str(port), str(script), *args]
    proc = subprocess.run(cmd, cwd=REPO, env=launch_env(), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        pytest.fail(f"deepspeed exited {proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    if check:
        leaked = sorted(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_{os.getuid()}_127.0.0.1_{port}_*"))
        assert not leaked, f"the run left DeepSpeed's all-reduce workspaces in /dev/shm: {leaked}"
    return proc


def run_torchrun(
    nproc: int, script: str | Path, args: list[str], timeout: float = 300, check: bool = True
) -> subprocess.CompletedProcess:
    cmd = [str(BIN / "torchrun"), f"--nproc_per_node={nproc}", f"--master_port={free_port()}", str(script), *args]
    proc = subprocess.run(cmd, cwd=REPO, env=launch_env(), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        pytest.fail(f"torchrun exited {proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return proc


TRAIN = REPO / "launch" / "train.py"
