"""`python launch/compare.py --help`: see docs/pruning.md (same as the `twist-compare` console script)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a checkout without install

from twist_scale.commands.replay import main  # noqa: E402

if __name__ == "__main__":
    main()
