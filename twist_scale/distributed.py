"""Process-group setup for every launcher (deepspeed, torchrun, srun, a plain process) and the one
place that decides on which device collectives take their tensors.
"""

from __future__ import annotations

import datetime
import os
import socket
from pathlib import Path

import torch
import torch.distributed as dist

from twist_scale.config import ConfigError

SLURM_TO_TORCH = {"SLURM_PROCID": "RANK", "SLURM_LOCALID": "LOCAL_RANK", "SLURM_NTASKS": "WORLD_SIZE"}


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (single-node launches)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def resolve_backend(backend: str) -> str:
    """'auto' becomes nccl on a GPU node and gloo elsewhere; anything else is used as given."""
    if backend == "auto":
        return "nccl" if torch.cuda.is_available() else "gloo"
    return backend


def served_device_types(backend: str) -> list[str]:
    """Device types whose tensors `backend` accepts, as torch routes them.

    gloo can take CUDA tensors but stages them through host memory, so it is treated as a host
    backend; the per-device form 'cpu:gloo,cuda:nccl' serves each named device type.
    """
    if ":" in backend:
        return [pair.split(":")[0].strip() for pair in backend.split(",")]
    if backend == "gloo":
        return ["cpu"]
    return list(dist.Backend.backend_capability.get(backend.lower(), ["cpu"]))


def comm_device(group: dist.ProcessGroup | None = None) -> torch.device:
    """The device of every tensor this process hands to a collective on `group`.

    NCCL serves CUDA tensors only, so a CPU tensor on an NCCL group raises. An accelerator the
    backend serves wins over the host (engines keep their tensors there); a host-only backend gets CPU.
    """
    served = served_device_types(dist.get_backend(group))
    accelerators = [t for t in served if t != "cpu" and (t != "cuda" or torch.cuda.is_available())]
    if not accelerators:
        return torch.device("cpu")
    if accelerators[0] == "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device(accelerators[0])


def local_ranks() -> int:
    """How many ranks share this host, from whichever launcher started this one (1 if none says)."""
    for name in ("LOCAL_WORLD_SIZE", "LOCAL_SIZE", "SLURM_NTASKS_PER_NODE"):  # torchrun, deepspeed, srun
        value = os.environ.get(name, "").split("(")[0]  # srun writes e.g. '4(x2)'
        if value.isdigit():
            return int(value)
    return 1


def share_cores() -> None:
    """Give each rank its share of the host's cores, unless OMP_NUM_THREADS decides.

    torch starts one intra-op thread per core in every process, so N ranks on a host oversubscribe its
    cores N-fold, and idle OpenMP threads spin on cores another rank needs: measured here, 2 ranks on
    2 cores ran their training steps 2x slower after the packed exchange's element-wise work.
    torchrun sets OMP_NUM_THREADS=1 for this reason; the deepspeed launcher and srun do not.
    """
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // local_ranks()))


RENDEZVOUS_S = 900.0  # how long rank 0 waits for every rank to start


def init_distributed(backend: str, timeout_s: float = 600.0) -> None:
    """Initialise the default process group from the launcher's environment.

    Under srun only SLURM_* variables exist; DeepSpeed would otherwise try MPI discovery.
    """
    share_cores()
    for slurm, torch_name in SLURM_TO_TORCH.items():
        if slurm in os.environ and torch_name not in os.environ:
            os.environ[torch_name] = os.environ[slurm]
    if "RANK" not in os.environ:  # a plain `python launch/train.py`: a world of one
        os.environ.update(
            RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port())
        )
    backend = resolve_backend(backend)
    if "cuda" in served_device_types(backend):
        if not torch.cuda.is_available():
            raise RuntimeError(
                f"--parallel.backend {backend} needs a CUDA GPU, and this process sees none; use gloo on CPU"
            )
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        import deepspeed

        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        # Ranks may start minutes apart (slow imports on a loaded node, nodes of a job starting late):
        # the rendezvous waits for them longer than a collective waits for a stuck rank.
        addr, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
        try:
            store = dist.TCPStore(
                addr, port, world, is_master=rank == 0, timeout=datetime.timedelta(seconds=max(timeout_s, RENDEZVOUS_S))
            )
        except dist.DistNetworkError as err:
            if "EADDRINUSE" not in str(err):
                raise
            raise ConfigError(
                f"port {port} on {addr} is taken (another run?): give the launcher another one with --master_port"
            ) from None
        cuda = "cuda" in served_device_types(backend) and world > 1  # bind the GPU: NCCL connects eagerly
        device = {"device_id": torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))} if cuda else {}
        timeout = datetime.timedelta(seconds=timeout_s)
        dist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=timeout, **device)
        deepspeed.init_distributed(dist_backend=backend, timeout=timeout)  # wraps the group just made


def close_distributed() -> None:
    """Destroy every process group before the interpreter exits.

    Live groups at shutdown can abort the process ('terminate called without an active exception')
    after all work is done, turning a finished run into a failed job, most often on a loaded node.
    """
    if dist.is_initialized():
        rank = dist.get_rank()
        dist.destroy_process_group()
        release_shared_memory(rank)


SHM_DIR = Path("/dev/shm")


def deepspeed_shm_name(addr: str, port: str | int, rank: int | str) -> str:
    """DeepSpeed's CPU all-reduce workspace of one rank (its shm.cpp `shm_initialize`); rank '*' globs a world's."""
    return f"deepspeed_allreduce_buffer_{os.getuid()}_{addr}_{port}_{rank}"


def release_shared_memory(rank: int) -> None:
    """Unlink this rank's DeepSpeed CPU all-reduce workspace (69 MB in /dev/shm).

    DeepSpeed creates it at initialisation and never unlinks it, so every CPU launch would leave
    69 MB per rank of RAM behind until reboot. Peers mapped it at initialisation, so unlinking the
    name at exit takes nothing from a rank still running.
    """
    addr, port = os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", "")
    (SHM_DIR / deepspeed_shm_name(addr, port, rank)).unlink(missing_ok=True)
