"""Topology layout at scale in one process: every rank of a 64-rank world, no process group."""

from __future__ import annotations

import pytest

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
