"""Console scripts. Training itself is launched through `deepspeed launch/train.py` or torchrun."""

from __future__ import annotations

import sys

from twist_scale.config import ConfigError, load_config


def train(argv: list[str] | None = None) -> None:
    """`twist-train --config FILE [--section.key V]`: one process per rank, under any launcher."""
    try:
        cfg = load_config(argv)
    except ConfigError as err:
        sys.exit(f"config error: {err}")
    from twist_scale.trainer import Trainer

    Trainer(cfg).train()
