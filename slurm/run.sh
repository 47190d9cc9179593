#!/usr/bin/env bash
# Runs inside an allocation, from train_1node.sbatch or train_multinode.sbatch: rendezvous, then
# one srun task per rank. twist_scale/distributed.py maps SLURM_PROCID/LOCALID/NTASKS to
# RANK/LOCAL_RANK/WORLD_SIZE; MASTER_ADDR/PORT must come from here, or DeepSpeed tries MPI.
#
# Settings (environment variables, read at submit time since sbatch exports the environment):
#   CONFIG      run config TOML                         (default configs/twist_brown.toml)
#   EXTRA_ARGS  extra --section.key VALUE overrides     (default none)
#   OUT_DIR     run directory; keep it fixed so a requeued or resubmitted job resumes there
#               (default: the config's out_dir)
#   VENV        virtualenv with twist-scale installed   (default <repo>/.venv)
#   REPO        checkout to run from                    (default the directory sbatch ran in)
#   MASTER_PORT rendezvous port on the first node       (default 20000 + job id % 20000)
set -euo pipefail

REPO=${REPO:-${SLURM_SUBMIT_DIR:-$PWD}}
CONFIG=${CONFIG:-configs/twist_brown.toml}
EXTRA_ARGS=${EXTRA_ARGS:-}
VENV=${VENV:-$REPO/.venv}
cd "$REPO"

if [[ ! -x "$VENV/bin/python" ]]; then
    echo "no python in VENV=$VENV; run 'make setup' in $REPO or set VENV" >&2
    exit 2
fi
export PATH="$VENV/bin:$PATH"
export PYTHONUNBUFFERED=1
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}
MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)  # the first node of the job
export MASTER_ADDR
export MASTER_PORT=${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}

args=(--config "$CONFIG")
if [[ -n "${OUT_DIR:-}" ]]; then args+=(--out_dir "$OUT_DIR"); fi
read -r -a extra <<<"$EXTRA_ARGS"
args+=("${extra[@]}")

echo "$(date -Is) job $SLURM_JOB_ID restart ${SLURM_RESTART_COUNT:-0}: ${SLURM_JOB_NUM_NODES} node(s)," \
    "${SLURM_NTASKS} ranks, rendezvous $MASTER_ADDR:$MASTER_PORT, config $CONFIG ${EXTRA_ARGS}"
# --kill-on-bad-exit: one failed rank ends the step instead of leaving the others in a collective.
# --cpus-per-task again: srun does not inherit it from sbatch in Slurm 22.05-23.02.
srun --kill-on-bad-exit=1 --cpus-per-task="${SLURM_CPUS_PER_TASK:-1}" python launch/train.py "${args[@]}"
