"""Topology process groups at scale in one process (a 64-rank world on the 'fake' backend), and the
run's timeout on every subgroup."""

from __future__ import annotations

import pytest
import torch.distributed as dist
from helpers.dist import run_on_ranks
from torch.testing._internal.distributed.fake_pg import FakeStore

from twist_scale.topology import Topology
from workers.timeouts import stuck_peer_in_the_cross_group


def test_process_groups_on_fake_backend():
    dist.init_process_group("fake", store=FakeStore(), rank=37, world_size=64)
    try:
        topo = Topology.from_dist(groups=8)
        assert (topo.group, topo.dp_rank) == (4, 5)
        assert dist.get_process_group_ranks(topo.intra_group) == list(range(32, 40))
        assert dist.get_process_group_ranks(topo.cross_group) == [5 + 8 * g for g in range(8)]
        assert topo.get_data_parallel_world_size() == 8 and topo.get_model_parallel_world_size() == 1
        assert dist.get_process_group_ranks(topo.get_model_parallel_group()) == [37]
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_a_silent_rank_ends_a_subgroup_collective_at_the_runs_timeout():
    run_on_ranks(stuck_peer_in_the_cross_group, 2)
