"""The 'strict' process group (tests/helpers/strict_device.py) that e2e/test_device_runs.py trains under:
like NCCL, it serves one device type and refuses host tensors."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from helpers import strict_device

from twist_scale.assembly import assemble
from twist_scale.config import RunConfig
from twist_scale.correction import is_statistic
from twist_scale.distributed import comm_device
from twist_scale.topology import Topology


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




def test_aggregation_sends_engine_values_from_the_accelerator_beside_host_statistics(tmp_path):
    """A GPU engine's shards are read on the device while correction `mean`'s statistics come from the
    host; the first GPU run concatenated both into one payload and failed. Reads moved to the served
    device here stand in for that engine: the round trip dispatch → aggregate keeps every value."""
    if "strict" not in dist.Backend.backend_list:
        strict_device.install()
    dist.init_process_group("strict", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        cfg = RunConfig()
        cfg.parallel.engine, cfg.twist.kappa, cfg.twist.allow_uncovered = "local", 0.5, True
        cfg.twist.correction, cfg.twist.optimizer_state, cfg.twist.wire_dtype = "mean", "aggregate", "bf16"
        topo = Topology.from_dist(1)
        built = assemble(cfg, topo, 64)
        sync, specs = built.sync, built.sampler.specs(0)
        sync.dispatch(specs)
        before = {name: sync.central.gather(name) for name in sync.central.shapes}
        read_on_host = sync.read_shard
        moved = []

        def read_on_device(entry):  # noqa: ANN001, ANN202
            start, values = read_on_host(entry)
            if not is_statistic(entry.name):
                moved.append(entry.name)
                values = values.to(comm_device())
            return start, values

        sync.read_shard = read_on_device
        sync.aggregate(specs)
        assert moved and any(is_statistic(name) for name in before)  # both kinds of read in one exchange
        for name, value in before.items():
            assert torch.equal(sync.central.gather(name), value), name
    finally:
        dist.destroy_process_group()
