"""helpers.dist.run_on_ranks: a real gloo group on every rank, and a rank's failure fails the test with its message."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
from helpers.dist import run_on_ranks


def sum_of_ranks(rank: int, world: int, scale: int) -> None:
    assert (dist.get_rank(), dist.get_world_size()) == (rank, world)
    assert os.environ["RANK"] == str(rank) and os.environ["WORLD_SIZE"] == str(world)
    total = torch.tensor([float(rank * scale)])
    dist.all_reduce(total)
    assert total.item() == scale * world * (world - 1) / 2


def rank_one_disagrees(rank: int, world: int) -> None:
    got = [rank, 1]
    assert got == [rank, rank], "ranks disagree"


def test_every_rank_joins_one_gloo_group():
    run_on_ranks(sum_of_ranks, 2, 10)


def test_a_failing_rank_fails_the_test_with_its_assertion():
    with pytest.raises(pytest.fail.Exception) as failure:
        run_on_ranks(rank_one_disagrees, 2, timeout=120)
    message = str(failure.value)
    assert "rank_one_disagrees failed on rank(s) [0" in message and "-- rank 0 of 2:" in message
    assert "AssertionError: ranks disagree" in message and "assert [0, 1] == [0, 0]" in message  # pytest's diff


def greet_then_fail_on_rank_one(rank: int, world: int) -> None:
    print(f"hello from rank {rank}", flush=True)
    dist.barrier()
    if rank == 1:
        raise FloatingPointError("rank one gives up")


def test_ranks_output_and_allowed_failures_come_back_to_the_caller():
    ranks = run_on_ranks(greet_then_fail_on_rank_one, 2, timeout=120, may_fail=True)
    assert "hello from rank 0" in ranks.output and "hello from rank 1" in ranks.output
    assert "FloatingPointError: rank one gives up" in ranks.failures[1]  # rank 0 may fail after, at the barrier
