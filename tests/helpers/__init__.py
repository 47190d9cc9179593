"""Shared test helpers: repository paths, tiny runs on the sample corpora and launcher runs.

Importable from every test folder (`pythonpath = ["tests"]` in pyproject.toml); conftest.py keeps
only fixtures and hooks. `helpers.models` holds tiny random models, `helpers.dist` runs a function
on N in-process ranks, `helpers.strict_device` is the single-device process group.
"""

from __future__ import annotations

import functools
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO

import pytest

from twist_scale.distributed import SHM_DIR, deepspeed_shm_name, free_port

REPO = Path(__file__).resolve().parents[2]
DATA = (REPO / ".." / "shared" / "data").resolve()
SHAKESPEARE = DATA / "tinyshakespeare" / "input.txt"
BROWN_VALID = DATA / "brown" / "valid.txt"
BIN = Path(sys.executable).parent
TRAIN = REPO / "launch" / "train.py"


@functools.cache
def _empty_mlflow_store() -> Path:
    """An MLflow sqlite store with its schema already migrated (a fresh one costs seconds per run)."""
    import mlflow

    path = Path(tempfile.mkdtemp(prefix="twist-mlflow-")) / "mlflow.db"
    mlflow.MlflowClient(tracking_uri=f"sqlite:///{path}").search_experiments()
    return path


@functools.cache
def _shared_tokenizer() -> Path:
    """The tiny runs' tokenizer, trained once per session and passed as --data.tokenizer, as a user passes
    one: the runs' token cache is then shared too (its key names the tokenizer), so no launch spends
    seconds re-tokenising Tiny Shakespeare. Tests of tokenizer training and caching use their own dirs."""
    from twist_scale.tokenizer import train_tokenizer

    directory = Path(tempfile.mkdtemp(prefix="twist-tokenizer-"))
    train_tokenizer([str(SHAKESPEARE)], directory, vocab_size=512)
    return directory


def tiny_args(out_dir: Path, **overrides: object) -> list[str]:
    """CLI args for a seconds-long run of the tiny Llama on Tiny Shakespeare (later flags win)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    if not (out_dir / "mlflow.db").exists():
        shutil.copy(_empty_mlflow_store(), out_dir / "mlflow.db")
    tokenizer = _shared_tokenizer()
    args = [
        "--config",
        str(REPO / "configs" / "tiny_test.toml"),
        "--out_dir",
        str(out_dir),
        "--data.train_files",
        str(SHAKESPEARE),
        "--data.valid_files",
        str(BROWN_VALID),
        "--data.tokenizer",
        str(tokenizer),
        "--data.cache_dir",
        str(tokenizer / "cache"),
    ]
    for key, value in overrides.items():
        args += [f"--{key.replace('__', '.')}", str(value)]
    return args


def launch_env() -> dict[str, str]:
    env = dict(os.environ, DS_ACCELERATOR="cpu", PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    env["PATH"] = f"{BIN}:{env['PATH']}"
    return env


def leaked_shared_memory(port: int) -> list[Path]:
    """DeepSpeed CPU all-reduce workspaces still in /dev/shm for a world that used `port`."""
    return sorted(SHM_DIR.glob(deepspeed_shm_name("127.0.0.1", port, "*")))


# How each launcher starts `nproc` ranks of a script on 127.0.0.1 (`python` starts one, with no launcher).
LAUNCHERS: dict[str, Callable[[int, int], list[str]]] = {
    "deepspeed": lambda nproc, port: [str(BIN / "deepspeed"), "--num_gpus", str(nproc), "--master_port", str(port)],
    "torchrun": lambda nproc, port: [str(BIN / "torchrun"), f"--nproc_per_node={nproc}", f"--master_port={port}"],
    "python": lambda nproc, port: [sys.executable],
}


def launch_command(launcher: str, nproc: int, args: list[str], port: int, script: Path = TRAIN) -> list[str]:
    return [*LAUNCHERS[launcher](nproc, port), str(script), *args]


def launch(
    launcher: str, nproc: int, args: list[str], script: Path = TRAIN, timeout: float = 300, check: bool = True
) -> subprocess.CompletedProcess:
    """A real launch of `script` (launch/train.py) run to its end; a clean run leaves no shared memory behind."""
    port = free_port()
    cmd = launch_command(launcher, nproc, args, port, script)
    proc = subprocess.run(cmd, cwd=REPO, env=launch_env(), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        pytest.fail(f"{launcher} exited {proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    if check:
        leaked = leaked_shared_memory(port)
        assert not leaked, f"the run left DeepSpeed's all-reduce workspaces in /dev/shm: {leaked}"
    return proc


def launch_background(
    launcher: str,
    nproc: int,
    args: list[str],
    output: IO[str] | int = subprocess.PIPE,
    launcher_args: list[str] | None = None,
    port: int | None = None,
) -> subprocess.Popen:
    """A real launch left running, in its own session so the launcher and its ranks can be signalled together.

    `launcher_args` replace the single-node options (e.g. a deepspeed hostfile and node rank).
    """
    cmd = launch_command(launcher, nproc, args, port or free_port())
    if launcher_args is not None:
        cmd = [cmd[0], *launcher_args, str(TRAIN), *args]
    return subprocess.Popen(
        cmd, cwd=REPO, env=launch_env(), stdout=output, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )


def stop(proc: subprocess.Popen) -> None:
    """Kill a process group started with start_new_session: the leader and whatever it left behind (a rank
    stopped by a test outlives its launcher otherwise)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass  # the whole group has exited
    proc.wait()


def mlflow_run(out_dir):
    """(client, run) of the MLflow run a training run logged into, from the sqlite store in its out_dir."""
    from mlflow.tracking import MlflowClient

    from twist_scale.tracking import default_uri

    client = MlflowClient(tracking_uri=default_uri(out_dir))
    run = client.get_run((out_dir / "mlflow_run_id").read_text().strip())
    return client, run


def history(client, run, key: str) -> list[float]:
    return [m.value for m in sorted(client.get_metric_history(run.info.run_id, key), key=lambda m: m.step)]


def assert_fp32_checkpoint(directory) -> None:
    from safetensors import safe_open

    with safe_open(str(directory / "model.safetensors"), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F32"}
