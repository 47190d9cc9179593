"""The fine-tuning quality benchmark's pure helpers: the equal wall-clock budget and the draw picking summary."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))  # bench scripts import each other by name

from quality_finetune import pick_summary, wall_rounds  # noqa: E402


def test_wall_rounds_scales_by_the_time_ratio_and_never_shrinks() -> None:
    assert wall_rounds(6, dense_seconds=160.0, twist_seconds=100.0) == 10
    assert wall_rounds(6, dense_seconds=90.0, twist_seconds=100.0) == 6


def test_pick_summary_ranks_the_draw_with_the_lowest_picking_loss() -> None:
    summary = pick_summary([120.0, 100.0, 110.0, 130.0], pick_losses=[4.0, 4.2, 3.9, 4.5])
    assert summary["picked"] == 2
    assert summary["picked_ppl"] == 110.0
    assert summary["picked_rank"] == 2
    assert summary["mean"] == pytest.approx(115.0)
    assert summary["pm_pct"] == pytest.approx(50 * 30 / 115)
