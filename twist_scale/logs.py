"""The one log format of every program: time, [rank], logger and message, one record a line on stderr."""

from __future__ import annotations

import logging


def setup_logging(rank: int | None = None) -> None:
    """INFO for a command-line program (rank None); in a distributed run rank-tagged, INFO on rank 0 only.

    A rank replaces whatever handlers were installed before it was known.
    """
    tag = "" if rank is None else f"[rank {rank}] "
    logging.basicConfig(
        level=logging.INFO if not rank else logging.WARNING,
        format=f"%(asctime)s {tag}%(name)s: %(message)s",
        datefmt="%H:%M:%S",
        force=rank is not None,
    )
