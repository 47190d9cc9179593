"""Masked reduce-scatter aggregation under real DeepSpeed engines on gloo equals the holder-mean formula."""

from __future__ import annotations

import pytest
from helpers.dist import run_on_ranks
from workers.aggregation import check_cases, check_moment_dispatch, check_shifts

ALL = ["disjoint", "overlapping", "uncovered", "mixed"]  # mixed: a sandwich of unequal kappas


@pytest.mark.slow
@pytest.mark.parametrize(
    ("world", "cases"),
    [
        (2, [*(f"2:1:{kind}" for kind in ALL), "2:3:overlapping"]),  # G=2, R=1
        # G=2 with R=2 (the dp position inside a group) and G=4 with R=1; the rank arithmetic of
        # every G x R is tested on 64 fake ranks in unit/test_topology.py.
        (4, ["2:1:overlapping", "2:2:mixed", "2:3:uncovered", "4:1:uncovered", "4:3:overlapping"]),
    ],
)
def test_aggregation_matches_holder_mean(world, cases):
    run_on_ranks(check_cases, world, cases)


@pytest.mark.slow
def test_moments_aggregate_and_dispatch_only_the_range_each_rank_stores():
    run_on_ranks(check_moment_dispatch, 4, [2, 3])


@pytest.mark.slow
def test_mean_correction_shifts_are_computed_where_the_weights_are():
    run_on_ranks(check_shifts, 4, [1, 3])
