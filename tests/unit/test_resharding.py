"""Resharding a checkpoint for another world: the central pieces, the data position, and the refusal
where a component cannot reshard."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from twist_scale.batches import ShardedBatches
from twist_scale.central import CentralShards
from twist_scale.checkpoint import Checkpointer, RngState
from twist_scale.checkpoint_manifest import MANIFEST
from twist_scale.sync import DataParallelSync
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


def test_a_component_that_cannot_reshard_refuses_another_world_before_loading(tmp_path):
    (tmp_path / MANIFEST).write_text(json.dumps({"round": 3, "files": {}, "world_size": 4, "groups": 2}))
    checkpointer = Checkpointer(tmp_path.parent, rank=0, keep_last=1, device=torch.device("cpu"), layout=(2, 1))
    dense = DataParallelSync(storage=None)  # a dense run: the model lives in the engine's own files
    with pytest.raises(ValueError, match="written by 4 processes in 2 group.*launch 4 processes with --twist.groups 2"):
        checkpointer.load_run(tmp_path, {"central": dense, "rng": RngState()}, engine=None)


class Central:
    """The central pieces as the trainer checkpoints them (a stateful component that reshards)."""

    def __init__(self, central: CentralShards) -> None:
        self.central = central

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.central.shards

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.central.shards = dict(state)

    def load_resharded(self, states, old_world: int) -> None:  # noqa: ANN001
        self.central.load_resharded(states, old_world)


def test_a_resharding_rank_opens_only_the_old_files_that_meet_its_pieces(tmp_path, monkeypatch):
    """8 → 4 ranks: rank r's pieces meet old ranks 2r and 2r + 1, and a neighbour where a tensor's pieces
    do not divide evenly; it also reads rank 0's file (the data position). Never all 8."""
    shapes = {"w": torch.Size([65, 33]), "e": torch.Size([41, 17])}  # pieces of hundreds of elements, uneven
    full = {name: torch.randn(shape) for name, shape in shapes.items()}

    def pieces_of(world: int, rank: int) -> dict[str, torch.Tensor]:
        central = CentralShards(Topology(world, rank, 1), shapes)
        for name, t in full.items():
            central.set_full(name, t)
        return central.shards

    for q in range(8):
        torch.save({"round": 5, "central": pieces_of(8, q)}, tmp_path / f"rank_{q:05d}.pt")
    (tmp_path / MANIFEST).write_text(json.dumps({"round": 5, "files": {}, "world_size": 8, "groups": 1}))
    load = torch.load
    opened: list[str] = []
    monkeypatch.setattr(torch, "load", lambda path, **kw: opened.append(path.name) or load(path, **kw))
    for rank in range(4):
        opened.clear()
        checkpointer = Checkpointer(tmp_path.parent, rank, keep_last=1, device=torch.device("cpu"), layout=(4, 1))
        central = Central(CentralShards(Topology(4, rank, 1), shapes))
        assert checkpointer.load_run(tmp_path, {"central": central}, engine=None) == (5, True)
        assert len(opened) == len(set(opened)), opened  # each file once
        neighbours = {f"rank_{q:05d}.pt" for q in (0, 2 * rank - 1, 2 * rank, 2 * rank + 1, 2 * rank + 2)}
        assert {f"rank_{2 * rank:05d}.pt", f"rank_{2 * rank + 1:05d}.pt"} <= set(opened) <= neighbours, opened
        for name, piece in pieces_of(4, rank).items():
            assert torch.equal(central.central.shards[name], piece), (name, rank)
