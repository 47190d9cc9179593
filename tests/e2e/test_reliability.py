"""Failures that never hang or lose work, in real runs: SIGKILL + exact resume, a stuck rank,
non-finite losses and weights, bad inputs caught before work starts. (Skipped steps in one engine:
unit/test_nonfinite_steps.py; corrupted checkpoints: dist/test_checkpoint.py.)"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
from helpers import BIN, REPO, TRAIN, free_port, history, launch_env, mlflow_run, run_deepspeed, tiny_args

TWIST = dict(
    twist__groups=2,
    twist__kappa=0.5,
    twist__correction="mean",
    twist__optimizer_state="aggregate",
    twist__local_steps=3,
    twist__rounds=6,
    eval__every_rounds=0,
)


def launch_background(out_dir, **overrides) -> subprocess.Popen:
    cmd = [
        str(BIN / "deepspeed"),
        "--num_gpus",
        "2",
        "--master_port",
        str(free_port()),
        str(TRAIN),
        *tiny_args(out_dir, **overrides),
    ]
    return subprocess.Popen(
        cmd,
        cwd=REPO,
        env=launch_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def rank_pid(launcher: subprocess.Popen, rank: int) -> int:
    """The pid of one training rank among the launcher's descendants."""
    rows = [
        line.split(maxsplit=2)
        for line in subprocess.run(
            ["ps", "-ww", "-eo", "pid=,ppid=,args="], capture_output=True, text=True
        ).stdout.splitlines()
    ]
    family = {launcher.pid}
    for _ in range(4):  # launcher -> deepspeed.launcher.launch -> ranks
        family |= {int(pid) for pid, ppid, _ in rows if int(ppid) in family}
    for pid, _, args in rows:
        if int(pid) in family and f"--local_rank={rank}" in args and "launch/train.py" in args:
            return int(pid)
    raise AssertionError(f"rank {rank} not among {sorted(family)}: {[r for r in rows if int(r[0]) in family]}")


def wait_for(path, proc: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while not path.exists():
        assert proc.poll() is None, f"run ended early:\n{proc.stdout.read()[-3000:]}"
        assert time.time() < deadline, f"{path} never appeared"
        time.sleep(0.05)


def losses_by_step(out_dir) -> dict[int, float]:

    client, run = mlflow_run(out_dir)
    return {
        m.step: m.value
        for m in sorted(client.get_metric_history(run.info.run_id, "train/loss"), key=lambda m: m.timestamp)
    }


@pytest.mark.slow
def test_sigkill_mid_round_then_resume_is_exact(tmp_path):
    """Under the default packed exchange. Neither exchange keeps state between rounds (a checkpoint is
    the central shards, written by one code path), and the dense one's sums are checked against the
    holder-mean oracle in tests/dist, so one exchange covers resume."""
    run_deepspeed(2, TRAIN, tiny_args(tmp_path / "reference", **TWIST))
    reference = history(*mlflow_run(tmp_path / "reference"), "train/loss")

    out = tmp_path / "killed"
    proc = launch_background(out, **TWIST)
    wait_for(out / "checkpoints" / "round_000002" / "manifest.json", proc)
    os.kill(rank_pid(proc, 1), signal.SIGKILL)
    proc.wait(timeout=120)
    assert proc.returncode != 0  # killed mid-run, not finished
    assert not (out / "final").exists()
    run_deepspeed(2, TRAIN, tiny_args(out, **TWIST))  # resumes from the newest valid checkpoint
    resumed = losses_by_step(out)
    assert sorted(resumed) == list(range(1, 19))
    assert [resumed[s] for s in range(1, 19)] == reference  # step for step, exactly


@pytest.mark.slow
def test_stuck_rank_ends_the_job_naming_rank_and_phase(tmp_path):
    out = tmp_path / "stuck"
    proc = launch_background(out, parallel__timeout_s=8, **{**TWIST, "twist__rounds": 200})
    wait_for(out / "checkpoints" / "round_000001" / "manifest.json", proc)
    os.kill(rank_pid(proc, 1), signal.SIGSTOP)  # alive but never answers
    start = time.time()
    try:
        output, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode != 0 and time.time() - start < 120
    assert "rank 0 (group 0) failed in phase" in output, output[-3000:]


def local_run(out_dir, *extra: str) -> subprocess.CompletedProcess:
    args = [*tiny_args(out_dir), "--parallel.engine", "local", *extra]
    return subprocess.run(
        [sys.executable, str(TRAIN), *args], cwd=REPO, env=launch_env(), capture_output=True, text=True, timeout=300
    )


def test_nonfinite_loss_stops_without_a_nan_checkpoint(tmp_path):
    proc = local_run(tmp_path / "stop", "--optim.lr", "1e30", "--optim.warmup_steps", "0")
    assert proc.returncode != 0
    assert "failed in phase 'local step'" in proc.stderr and "non-finite loss" in proc.stderr
    assert not list((tmp_path / "stop" / "checkpoints").glob("round_*"))


def test_nonfinite_weights_never_reach_a_checkpoint(tmp_path):
    """--on_nonfinite skip survives NaN losses, but a finite loss with overflowing gradients can still
    poison the weights: the checkpoint guard stops the run rather than write them."""
    out = tmp_path / "skip"
    proc = local_run(out, "--optim.lr", "1e30", "--optim.warmup_steps", "0", "--on_nonfinite", "skip")
    assert proc.returncode != 0
    assert "non-finite loss, step skipped" in proc.stderr
    assert "failed in phase 'checkpoint'" in proc.stderr and "refusing to overwrite" in proc.stderr
    assert not list((out / "checkpoints").glob("round_*"))


def test_vocab_mismatch_is_refused_before_training(tmp_path):
    from twist_scale.models import build_model

    small = tmp_path / "small-vocab"
    build_model("llama", "tiny", 64).save_pretrained(small)
    proc = local_run(tmp_path / "mismatch", "--model.pretrained", str(small))
    assert proc.returncode != 0
    assert "tokenizer has 512 tokens but the pretrained model only 64" in proc.stderr
    assert not (tmp_path / "mismatch" / "checkpoints").exists()
