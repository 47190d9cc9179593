"""Resharding a checkpoint for another world: the central pieces and the data position."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from twist_scale.aggregate import CentralShards
from twist_scale.data import ShardedBatches
from twist_scale.topology import Topology

SHAPES = {"w": torch.Size([7, 5]), "b": torch.Size([3]), "e": torch.Size([2, 11])}  # none divides evenly


def pieces(world: int, rank: int, full: dict[str, torch.Tensor]) -> CentralShards:
    central = CentralShards(Topology(world, rank, 1), SHAPES)
    for name, t in full.items():
        central.set_full(name, t)
        central.set_full(f"{name}@exp_avg", -t)
    return central


@pytest.mark.parametrize(("old", "new"), [(4, 2), (2, 4), (3, 2), (2, 5), (6, 1)])
def test_resharded_pieces_equal_pieces_cut_for_the_new_world(old, new):
    full = {
        name: torch.randn(shape, generator=torch.Generator().manual_seed(i))
        for i, (name, shape) in enumerate(SHAPES.items())
    }
    saved = [pieces(old, q, full).shards for q in range(old)]
    for rank in range(new):
        central = CentralShards(Topology(new, rank, 1), SHAPES)
        central.load_resharded(saved, old)
        expected = pieces(new, rank, full).shards
        assert central.shards.keys() == expected.keys()
        for name, piece in expected.items():
            assert torch.equal(central.shards[name], piece), (name, rank)


def test_data_position_carries_the_fraction_of_an_epoch():
    blocks = np.zeros((96, 4), dtype=np.int32)
    old = ShardedBatches(blocks, 0, 4, batch_size=2, seed=0)  # 24 rows, 12 batches per epoch
    for _ in range(12 + 3):  # one epoch and a quarter
        next(old)
    new = ShardedBatches(blocks, 1, 2, batch_size=2, seed=0)  # 48 rows, 24 batches per epoch
    new.load_resharded([old.state_dict()] * 4, old_world=4)
    assert (new.epoch, new.batch) == (1, 6)
