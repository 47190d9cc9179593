"""DeepSpeed engine behaviour on 2 in-process gloo ranks (see workers/engine.py)."""

from __future__ import annotations

import pytest
from helpers.dist import run_on_ranks
from workers.engine import check_write_trajectories_and_mask_hash


@pytest.mark.slow
def test_engine_writes_moments_stage_trajectories_and_mask_hash():
    run_on_ranks(check_write_trajectories_and_mask_hash, 2)
