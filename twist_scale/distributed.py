"""Process-group setup for every launcher: deepspeed, torchrun, srun, or a plain single process."""

from __future__ import annotations

import datetime
import logging
import os
import socket

import torch
import torch.distributed as dist

SLURM_TO_TORCH = {"SLURM_PROCID": "RANK", "SLURM_LOCALID": "LOCAL_RANK", "SLURM_NTASKS": "WORLD_SIZE"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(backend: str, timeout_s: float = 600.0) -> None:
    """Initialise the default process group from the launcher's environment.

    Under srun only SLURM_* variables exist; DeepSpeed would otherwise try MPI discovery.
    """
    for slurm, torch_name in SLURM_TO_TORCH.items():
        if slurm in os.environ and torch_name not in os.environ:
            os.environ[torch_name] = os.environ[slurm]
    if "RANK" not in os.environ:  # a plain `python launch/train.py`: a world of one
        os.environ.update(
            RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port())
        )
    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        import deepspeed

        deepspeed.init_distributed(dist_backend=backend, timeout=datetime.timedelta(seconds=timeout_s))


def setup_logging(rank: int) -> None:
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format=f"%(asctime)s [rank {rank}] %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        force=True,
    )
