"""`python launch/export.py --help`: see docs/pruning.md (same as the `twist-export` console script)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a checkout without install

from twist_scale.commands.export import main  # noqa: E402

if __name__ == "__main__":
    main()
