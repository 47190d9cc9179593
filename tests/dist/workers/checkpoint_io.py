"""Run on 2 ranks by `helpers.dist.run_on_ranks`: checkpoint I/O slower than the collective timeout."""

from __future__ import annotations

import datetime
import time
from pathlib import Path

import torch.distributed as dist

from twist_scale import checkpoint_manifest
from twist_scale.checkpoint import Checkpointer, RngState
from twist_scale.config import CheckpointConfig
from twist_scale.topology import Topology

COLLECTIVE_S = 2.0  # the run's --parallel.timeout_s
HASH_S = 3.0  # a checksum on a slow file system, longer than that


def slow_hash_under_a_short_collective_timeout(rank: int, world: int, root: str) -> None:
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=COLLECTIVE_S))
    topo = Topology.from_dist(groups=2, timeout_s=COLLECTIVE_S)
    checkpointer = Checkpointer.for_run(Path(root), topo, CheckpointConfig(timeout_s=60), last_round=1)
    fast = checkpoint_manifest._sha256
    checkpoint_manifest._sha256 = lambda path: (time.sleep(HASH_S), fast(path))[1]
    path = checkpointer.save_run(1, {"rng": RngState()}, None, {"world_size": world, "groups": 2})
    assert checkpointer.latest_valid() == path  # each rank checks its share, as slowly
    checkpoint_manifest._sha256 = fast
    dist.barrier()  # the default group still works after the long waits
    assert checkpoint_manifest.verify(path) is None
