"""Entry point for every launcher: `deepspeed launch/train.py --config configs/X.toml [--section.key V]`."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a checkout without install

from twist_scale.commands.train import main  # noqa: E402

if __name__ == "__main__":
    main()
