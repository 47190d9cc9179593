"""Entry point for every launcher: `deepspeed launch/train.py --config configs/X.toml [--section.key V]`."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a checkout without install

from twist_scale.config import ConfigError, load_config  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    try:
        cfg = load_config(argv)
    except ConfigError as err:
        sys.exit(f"config error: {err}")
    from twist_scale.trainer import Trainer

    Trainer(cfg).train()


if __name__ == "__main__":
    main()
