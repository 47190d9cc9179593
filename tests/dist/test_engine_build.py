"""Engines built from a meta-device TwIST subnet: FSDP2 shards before it allocates, ZeRO-3 partitions
one layer at a time (4 in-process gloo ranks, one group)."""

from __future__ import annotations

import pytest
from helpers.dist import run_on_ranks
from workers.engine_build import check_build_peak


@pytest.mark.slow  # 6-12 s each: a 38M-parameter model on four ranks
@pytest.mark.parametrize("engine", ["fsdp", "zero3"])
def test_an_engine_build_holds_the_ranks_shards_and_one_block(engine, tmp_path):
    run_on_ranks(check_build_peak, 4, engine, str(tmp_path), timeout=300)
