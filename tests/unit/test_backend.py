"""--parallel.backend: the forms torch accepts, and a CUDA backend refused on a machine without a GPU;
each rank's share of the host's cores."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
from helpers import SHAKESPEARE

from twist_scale.config import ConfigError
from twist_scale.config_load import load_config
from twist_scale.distributed import share_cores


def test_backend_accepts_torch_forms_and_refuses_unknown_names():
    data = ["--data.train_files", str(SHAKESPEARE)]
    for backend in ("auto", "gloo", "nccl", "cpu:gloo,cuda:nccl"):
        assert load_config([*data, "--parallel.backend", backend]).parallel.backend == backend
    for bad in ("glooo", "cpu:gloo,cuda", "gloo,nccl"):
        with pytest.raises(ConfigError, match="--parallel.backend"):
            load_config([*data, "--parallel.backend", bad])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without a GPU")
@pytest.mark.parametrize("backend", ["nccl", "cpu:gloo,cuda:nccl"])
def test_a_cuda_backend_without_a_gpu_is_refused_before_any_process_group(backend, monkeypatch):
    from twist_scale.distributed import init_distributed

    for name, value in dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1").items():
        monkeypatch.setenv(name, value)
    with pytest.raises(RuntimeError, match="needs a CUDA GPU.*use gloo on CPU"):
        init_distributed(backend)
    assert not dist.is_initialized()


@pytest.mark.parametrize(
    ("env", "ranks"),
    [({"LOCAL_WORLD_SIZE": "2"}, 2), ({"LOCAL_SIZE": "3"}, 3), ({"SLURM_NTASKS_PER_NODE": "4(x2)"}, 4), ({}, 1)],
)
def test_each_local_rank_gets_its_share_of_the_cores(env, ranks, monkeypatch):
    for name in ("OMP_NUM_THREADS", "LOCAL_WORLD_SIZE", "LOCAL_SIZE", "SLURM_NTASKS_PER_NODE"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    before = torch.get_num_threads()
    try:
        share_cores()
        assert torch.get_num_threads() == max(1, len(os.sched_getaffinity(0)) // ranks)
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        torch.set_num_threads(before)
        share_cores()  # an explicit OMP_NUM_THREADS wins
        assert torch.get_num_threads() == before
    finally:
        torch.set_num_threads(before)
