"""Masked reduce-scatter aggregation under real DeepSpeed engines on gloo equals the holder-mean formula."""

from __future__ import annotations

import pytest
from conftest import REPO, run_deepspeed

SCRIPT = REPO / "tests" / "dist" / "check_aggregation.py"
ALL = ["disjoint", "overlapping", "uncovered"]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("world", "cases"),
    [
        (2, [*(f"2:1:{kind}" for kind in ALL), "2:3:overlapping"]),  # G=2, R=1
        # G=2 with R=2 (the dp position inside a group) and G=4 with R=1; the rank arithmetic of
        # every G x R is tested on 64 fake ranks in test_topology.py.
        (4, ["2:1:overlapping", "2:3:uncovered", "4:1:uncovered", "4:3:overlapping"]),
    ],
)
def test_aggregation_matches_holder_mean(world, cases):
    proc = run_deepspeed(world, SCRIPT, cases, timeout=600)
    out = proc.stdout
    assert out.count("CASE ") == len(cases) and "AGGREGATION OK" in out, out[-3000:]
