"""slurm/train_1node.sbatch on a real one-node Slurm cluster started on this machine.

Debian's slurm-wlm is installed with apt when missing (CI runs as root). A machine that can
neither find nor install it fails this test; TWIST_SKIP_SLURM=1 opts out explicitly. The cluster
(no munge, no cgroups) lives in a tmp dir on free ports; its daemons run in the
foreground as children of the test and are stopped by PID.
"""

from __future__ import annotations

import getpass
import os
import re
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import BIN, BROWN_VALID, REPO, SHAKESPEARE, free_port, launch_env

from twist_scale.checkpoint_manifest import verify
from twist_scale.tracking import default_uri

pytestmark = pytest.mark.slow
SBIN_PATH = f"/usr/sbin:/sbin:{os.environ.get('PATH', '')}"
COMMANDS = ("slurmctld", "slurmd", "sbatch", "scontrol", "sinfo", "scancel")


def which(command: str) -> str | None:
    return shutil.which(command, path=SBIN_PATH)


def ensure_slurm() -> None:
    """Install slurm-wlm with apt when missing; fail (not skip) when that is impossible."""
    if os.environ.get("TWIST_SKIP_SLURM") == "1":
        pytest.skip("TWIST_SKIP_SLURM=1")
    if all(which(c) for c in COMMANDS):
        return
    if os.geteuid() != 0 or not which("apt-get"):
        pytest.fail(
            "Slurm is not installed and cannot be installed here (needs apt-get as root): "
            "apt-get install slurm-wlm, or set TWIST_SKIP_SLURM=1 to skip this test"
        )
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "slurm-wlm"]):
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
        if proc.returncode:
            pytest.fail(f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    missing = [c for c in COMMANDS if not which(c)]
    if missing:
        pytest.fail(f"slurm-wlm installed but {', '.join(missing)} not found")


def write_conf(root: Path, host: str) -> Path:
    """A single-node cluster: no authentication daemon, no cgroups, everything under `root`."""
    user = getpass.getuser()
    for sub in ("state", "spool"):
        (root / sub).mkdir()
    conf = root / "slurm.conf"
    conf.write_text(
        f"""ClusterName=twisttest
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={free_port()}
SlurmdPort={free_port()}
SlurmUser={user}
SlurmdUser={user}
AuthType=auth/none
CredType=cred/none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SchedulerType=sched/builtin
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
SlurmdParameters=config_overrides
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd.log
NodeName={host} NodeAddr=127.0.0.1 CPUs={max(2, os.cpu_count() or 1)} State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""
    )
    return conf


def command(cmd: list[str], env: dict[str, str], **kwargs) -> subprocess.CompletedProcess:  # noqa: ANN003
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=30, **kwargs)


def wait_for(predicate, what: str, timeout: float) -> None:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(1)


@pytest.fixture(scope="module")
def slurm_env(tmp_path_factory) -> Iterator[dict[str, str]]:
    """Start slurmctld and slurmd; yield the environment that points sbatch/scontrol at them."""
    ensure_slurm()
    root = tmp_path_factory.mktemp("slurm")
    host = socket.gethostname().split(".")[0]
    conf = write_conf(root, host)
    env = dict(launch_env(), SLURM_CONF=str(conf), PATH=f"{BIN}:{SBIN_PATH}")
    daemons: list[subprocess.Popen] = []
    try:
        for daemon in ("slurmctld", "slurmd"):  # -D: stay in the foreground, so the PID is ours to stop
            log = open(root / f"{daemon}.stdout", "w")  # noqa: SIM115 - closed with the process
            daemons.append(subprocess.Popen([which(daemon), "-D", "-f", str(conf)], env=env, stdout=log, stderr=log))

        def node_idle() -> bool:
            for d in daemons:
                if d.poll() is not None:
                    logs = "\n".join(p.read_text()[-2000:] for p in root.glob("slurm*.log"))
                    pytest.fail(f"{d.args[0]} exited {d.returncode}\n{logs}")
            return command([which("sinfo"), "-h", "-o", "%t"], env).stdout.strip() == "idle"

        wait_for(node_idle, "the node to become idle", 60)
        yield env
    finally:
        if daemons and which("scancel"):
            command([which("scancel"), "--user", getpass.getuser()], env)
        for d in reversed(daemons):
            d.terminate()
            try:
                d.wait(timeout=20)
            except subprocess.TimeoutExpired:
                d.kill()
                d.wait()
            d.stdout and d.stdout.close()


@pytest.mark.parametrize("script", sorted((REPO / "slurm").iterdir()), ids=lambda p: p.name)
def test_scripts_parse(script):
    """The multi-node script cannot run on a one-node cluster; at least bash must accept every script."""
    proc = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def job_field(env: dict[str, str], job_id: str, key: str) -> str:
    out = command([which("scontrol"), "show", "job", "-o", job_id], env).stdout
    match = re.search(rf"\b{key}=(\S+)", out)
    return match.group(1) if match else ""


def test_one_node_job_trains_logs_checkpoints_and_resumes_after_requeue(slurm_env, tmp_path):
    out_dir = tmp_path / "run"
    extra = [
        f"--data.train_files {SHAKESPEARE}",
        f"--data.valid_files {BROWN_VALID}",
        f"--data.cache_dir {tmp_path / 'cache'}",
        "--twist.groups 2 --twist.kappa 0.5 --twist.rounds 2",
    ]
    env = dict(
        slurm_env,
        REPO=str(REPO),
        VENV=str(BIN.parent),
        CONFIG=str(REPO / "configs" / "tiny_test.toml"),
        OUT_DIR=str(out_dir),
        EXTRA_ARGS=" ".join(extra),
        MASTER_PORT=str(free_port()),
    )
    # Submitted from tmp_path: the script's own --output default puts the job log there.
    cmd = [which("sbatch"), "--wait", "--parsable", str(REPO / "slurm" / "train_1node.sbatch")]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=150)
    job_id = proc.stdout.strip().split(";")[0]
    log = tmp_path / f"slurm-twist-{job_id}.out"
    text = log.read_text() if log.exists() else "(no job log)"
    assert proc.returncode == 0, f"sbatch exited {proc.returncode}: {proc.stderr}\n{text[-4000:]}"

    host = socket.gethostname().split(".")[0]
    assert f"rendezvous {host}:{env['MASTER_PORT']}" in text and "2 ranks" in text
    assert "round 2/2" in text
    checkpoint = out_dir / "checkpoints" / "round_000002"
    assert verify(checkpoint) is None
    assert sorted(p.name for p in checkpoint.iterdir()) == ["manifest.json", "rank_00000.pt", "rank_00001.pt"]
    run_id = (out_dir / "mlflow_run_id").read_text().strip()

    # A requeued job (preemption, node failure, `scontrol requeue`) reruns the script with the
    # same job id: it appends to the same log, resumes from the checkpoint and keeps the MLflow run.
    assert command([which("scontrol"), "requeue", job_id], env).returncode == 0
    # Slurm delays a requeued job's start by 120 s; start it now.
    assert command([which("scontrol"), "update", f"JobId={job_id}", "StartTime=now"], env).returncode == 0
    from mlflow.tracking import MlflowClient  # imported while the requeued job runs: it takes seconds

    def finished_again() -> bool:
        state = job_field(env, job_id, "JobState")
        if state in ("FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"):
            pytest.fail(f"requeued job {job_id} ended {state}:\n{log.read_text()[-4000:]}")
        return state == "COMPLETED" and job_field(env, job_id, "Restarts") == "1"

    wait_for(finished_again, f"requeued job {job_id} to complete", 90)
    text = log.read_text()
    assert "restart 1" in text and "resumed from" in text
    assert (out_dir / "mlflow_run_id").read_text().strip() == run_id

    client = MlflowClient(default_uri(out_dir))
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["twist.groups"] == "2"
    assert len(client.search_runs([run.info.experiment_id])) == 1
    steps = sorted(m.step for m in client.get_metric_history(run_id, "train/loss"))
    assert steps == list(range(1, 7))  # logged once: the resumed job trained nothing again
    final_evals = [m for m in client.get_metric_history(run_id, "eval/loss") if m.step == 6]
    assert len(final_evals) == 1  # both attempts evaluate at the end; the store keeps step 6 once
