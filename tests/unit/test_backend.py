"""--parallel.backend: the forms torch accepts, and a CUDA backend refused on a machine without a GPU."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from helpers import SHAKESPEARE

from twist_scale.config import ConfigError
from twist_scale.config_load import load_config


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
