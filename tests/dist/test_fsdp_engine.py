"""FSDP2 engine on 2 in-process gloo ranks: read/write, train, reset, save/load against SingleProcessEngine."""

from __future__ import annotations

import pytest
from helpers.dist import run_on_ranks
from workers.fsdp import check_against_local

pytestmark = pytest.mark.slow


def test_engine_matches_local_oracle(tmp_path):
    """Two ranks fed the same batch average to that batch's gradient: FSDP must equal SingleProcessEngine."""
    run_on_ranks(check_against_local, 2, str(tmp_path), timeout=240)
