"""A rank SIGKILLed under the real `deepspeed` launcher loses no work: the job ends, and the rerun resumes
step for step. SIGINT to the launcher's PID alone stops every rank, and the rerun finishes the run.
(A stuck rank, non-finite steps and weights: loop/test_failures.py; corrupted checkpoints:
dist/test_checkpoint.py.)"""

from __future__ import annotations

import os
import signal
import subprocess
import time

import psutil
from helpers import free_port, history, launch_background, leaked_shared_memory, mlflow_run, stop, tiny_args
from helpers.dist import train_on_ranks

TWIST = dict(
    twist__groups=2,
    twist__kappa=0.5,
    twist__correction="mean",
    twist__optimizer_state="aggregate",
    twist__local_steps=3,
    twist__rounds=6,
    eval__every_rounds=0,
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


def test_sigkill_mid_round_then_resume_is_exact(tmp_path):
    """Under the default packed exchange. Neither exchange keeps state between rounds (a checkpoint is
    the central shards, written by one code path), and the dense one's sums are checked against the
    holder-mean oracle in tests/dist, so one exchange covers resume."""
    train_on_ranks(2, tiny_args(tmp_path / "reference", **TWIST))
    reference = history(*mlflow_run(tmp_path / "reference"), "train/loss")

    out = tmp_path / "killed"
    port = free_port()
    proc = launch_background("deepspeed", 2, tiny_args(out, **TWIST), port=port)
    wait_for(out / "checkpoints" / "round_000002" / "manifest.json", proc)
    os.kill(rank_pid(proc, 1), signal.SIGKILL)
    proc.wait(timeout=120)
    assert proc.returncode != 0  # killed mid-run, not finished
    stop(proc)  # rank 0 may outlive the launcher, spinning in DeepSpeed's shared-memory all-reduce
    for path in leaked_shared_memory(port):  # the killed rank could not unlink its 69 MB workspace
        path.unlink()
    assert not (out / "final").exists()
    train_on_ranks(2, tiny_args(out, **TWIST))  # resumes from the newest valid checkpoint
    resumed = losses_by_step(out)
    assert sorted(resumed) == list(range(1, 19))
    assert [resumed[s] for s in range(1, 19)] == reference  # step for step, exactly


def test_sigint_to_the_launcher_alone_stops_every_rank_and_the_rerun_finishes_the_run(tmp_path):
    """`deepspeed`'s runner exits on SIGINT without telling its child launcher: the ranks notice it is
    gone, stop, mark the MLflow run KILLED and say how to resume."""
    out = tmp_path / "interrupted"
    longer = TWIST | {"twist__rounds": 16, "checkpoint__every_rounds": 2}
    proc = launch_background("deepspeed", 2, tiny_args(out, **longer))
    wait_for(out / "checkpoints" / "round_000002" / "manifest.json", proc)
    family = psutil.Process(proc.pid).children(recursive=True)
    assert len(family) >= 3, family  # deepspeed.launcher.launch and two ranks
    os.kill(proc.pid, signal.SIGINT)
    try:
        gone, alive = psutil.wait_procs(family, timeout=45)
        assert not alive, f"survived SIGINT to the launcher: {[p.cmdline()[-3:] for p in alive]}"
        output = proc.stdout.read()
    finally:
        stop(proc)
    assert "stopped (the launcher exited): rerun the same command to resume from" in output, output[-3000:]
    ranks = [line for line in output.splitlines() if line.startswith("[rank")]
    assert not ranks, ranks  # no traceback from any rank (the runner's own KeyboardInterrupt is DeepSpeed's)
    client, run = mlflow_run(out)
    assert run.info.status == "KILLED"
    assert not (out / "final").exists()

    train_on_ranks(2, tiny_args(out, **longer))
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")]
    assert sorted(steps) == list(range(1, 49)), steps  # each step once (unit/test_tracking_replay.py: repeats)
    assert client.get_run(run.info.run_id).info.status == "FINISHED"
