"""The 'strict' process group (tests/helpers/strict_device.py) that e2e/test_device_runs.py trains under:
like NCCL, it serves one device type and refuses host tensors."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from helpers import strict_device

from twist_scale.distributed import comm_device


def test_strict_backend_refuses_host_tensors(tmp_path):
    """The harness can fail: a CPU tensor on the 'strict' group raises NCCL's error."""
    if "strict" not in dist.Backend.backend_list:
        strict_device.install()
    dist.init_process_group("strict", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        assert comm_device() == torch.device("lazy")
        served = torch.ones(2, device="lazy")
        dist.all_reduce(served)
        assert served.cpu().tolist() == [1.0, 1.0]
        with pytest.raises(RuntimeError, match="No backend type associated with device type cpu"):
            dist.all_reduce(torch.ones(2))
    finally:
        dist.destroy_process_group()


