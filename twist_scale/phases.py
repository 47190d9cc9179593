"""Where a rank is in the round loop: a failure names the phase, and every phase is timed."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator


class Phases:
    """`with phases("aggregation"): ...` — seconds land in `phases.seconds["aggregation"]`; an error is
    re-raised naming the rank, group, phase and round (a peer that crashed, a collective timeout)."""

    def __init__(self, rank: int, group: int, current_round: Callable[[], int]) -> None:
        self.rank, self.group, self.current_round = rank, group, current_round
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        except Exception as err:
            raise RuntimeError(
                f"rank {self.rank} (group {self.group}) failed in phase '{name}' at round {self.current_round()}: "
                f"{type(err).__name__}: {err}"
            ) from err
        finally:
            self.seconds[name] = time.perf_counter() - start
