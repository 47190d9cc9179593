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
        (2, [f"2:{stage}:{kind}" for stage in (1, 3) for kind in ALL]),  # G=2, R=1
        (4, ["2:1:overlapping", "2:3:disjoint", "2:3:uncovered", "4:1:uncovered", "4:3:overlapping"]),  # R=2; R=1
        (8, ["4:3:uncovered"]),  # G=4, R=2
    ],
)
def test_aggregation_matches_holder_mean(world, cases):
    proc = run_deepspeed(world, SCRIPT, cases, timeout=600)
    out = proc.stdout
    assert out.count("CASE ") == len(cases) and "AGGREGATION OK" in out, out[-3000:]
