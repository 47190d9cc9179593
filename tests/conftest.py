"""Fixtures and hooks for every tier; shared helpers live in the `helpers` package (tests/helpers)."""

from __future__ import annotations

from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
# Whole runs: in-process on gloo ranks (tests/loop) or under a real launcher (tests/e2e).
SLOW_TIERS = (HERE / "loop", HERE / "e2e")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if any(tier in item.path.parents for tier in SLOW_TIERS):
            item.add_marker(pytest.mark.slow)
