"""Gradient accumulation and activation checkpointing under DeepSpeed and FSDP2 on 2 in-process ranks."""

from __future__ import annotations

import pytest
from helpers.dist import run_on_ranks
from workers.accumulation import check_accumulation_and_checkpointing


@pytest.mark.slow  # 15-40 s: nine engines on two ranks
def test_accumulated_micro_batches_and_checkpointed_layers_give_the_same_step():
    run_on_ranks(check_accumulation_and_checkpointing, 2, timeout=300)
