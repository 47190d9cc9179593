"""Run on 2 ranks by `helpers.dist.run_on_ranks`: a subgroup collective ends at the run's timeout."""

from __future__ import annotations

import time

import pytest
import torch

from twist_scale.topology import Topology

TIMEOUT_S = 2.0
SILENT_S = 12.0  # rank 1 stays alive, never joining: without the timeout rank 0 waits until it exits


def stuck_peer_in_the_cross_group(rank: int, world: int) -> None:
    topo = Topology.from_dist(groups=2, timeout_s=TIMEOUT_S)  # cross group = both ranks
    if rank == 1:
        time.sleep(SILENT_S)
        return
    start = time.monotonic()
    with pytest.raises(RuntimeError):
        torch.distributed.all_to_all_single(torch.empty(2), torch.ones(2), group=topo.cross_group)
    waited = time.monotonic() - start
    assert waited < SILENT_S / 2, f"the cross group waited {waited:.0f} s, not its {TIMEOUT_S} s timeout"
