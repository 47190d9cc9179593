"""`twist-replay`: send the MLflow records a run kept while its server was down (mlflow_backlog.jsonl)."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from twist_scale.backlog import SPILL_FILE
from twist_scale.commands import parser_for
from twist_scale.logs import setup_logging
from twist_scale.tracking import replay

log = logging.getLogger(__name__)


def main(argv: list[str] | None = None) -> None:
    """`twist-replay OUT_DIR [--tracking.uri URI]`: send a run's MLflow backlog, in order."""
    parser = parser_for("twist-replay", main.__doc__)
    parser.add_argument("out_dir", type=Path, help=f"the run directory holding {SPILL_FILE}")
    parser.add_argument(
        "--tracking.uri", dest="uri", default=None, help="tracking URI, if not the one the run used (the server moved)"
    )
    args = parser.parse_args(argv)
    setup_logging()
    if not replay(args.out_dir, args.uri):
        sys.exit(f"MLflow backlog not (fully) sent; it is still in {args.out_dir / SPILL_FILE}")
    log.info("MLflow backlog of %s replayed", args.out_dir)
