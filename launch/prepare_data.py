"""`python launch/prepare_data.py --config FILE`: see docs/data.md (same as the `twist-prepare-data` console script)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a checkout without install

from twist_scale.commands.prepare_data import main  # noqa: E402

if __name__ == "__main__":
    main()
