"""Topology at scale in one process: a 64-rank world on the 'fake' backend."""

from __future__ import annotations

import pytest
import torch.distributed as dist
from torch.testing._internal.distributed.fake_pg import FakeStore

from twist_scale.topology import Topology


@pytest.mark.parametrize(("world", "groups"), [(64, 8), (64, 4), (8, 8), (6, 3)])
def test_layout_covers_every_rank_once(world, groups):
    topos = [Topology(world, r, groups) for r in range(world)]
    R = world // groups
    assert {(t.group, t.dp_rank) for t in topos} == {(g, r) for g in range(groups) for r in range(R)}
    assert sorted(t.data_shard[0] for t in topos) == list(range(world))  # all ranks read distinct data
    for t in topos:
        assert t.rank in t.intra_ranks(t.group) and t.rank in t.cross_ranks(t.dp_rank)
        assert set(t.intra_ranks(t.group)) & set(t.cross_ranks(t.dp_rank)) == {t.rank}


def test_groups_must_divide_world():
    with pytest.raises(ValueError, match="does not divide the world size 64"):
        Topology(64, 0, 5)


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
