"""DeepSpeed engine behaviour under a real 2-process launch (see tests/dist/check_engine.py)."""

from __future__ import annotations

import pytest
from conftest import REPO, run_deepspeed


@pytest.mark.slow
def test_engine_writes_moments_stage_trajectories_and_mask_hash():
    out = run_deepspeed(2, REPO / "tests" / "dist" / "check_engine.py", [], timeout=600).stdout
    for stage in (0, 1, 2, 3):
        assert f"WRITE OK zero={stage}" in out, out[-3000:]
    for stage in (1, 2, 3):
        assert f"TRAJECTORY OK zero={stage}" in out, out[-3000:]
    assert "MASK HASH OK" in out
