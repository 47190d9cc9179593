"""`twist-evaluate`: held-out perplexity of the full model and its κ-subnets, logged to the run's MLflow run."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from twist_scale.commands import parser_for
from twist_scale.commands.export import add_pruning_args, pruner_from_args
from twist_scale.data import token_stream
from twist_scale.evaluate import DEFAULT_KAPPAS, format_sweep, log_sweep, resolve_run, sweep
from twist_scale.logs import setup_logging
from twist_scale.pruning.methods import check_kappa


def main(argv: list[str] | None = None) -> None:
    """`twist-evaluate RUN/final --data TEST.txt [--kappa ...] [--draws N]`: perplexity vs κ, logged to MLflow."""
    parser = parser_for("twist-evaluate", main.__doc__)
    add_pruning_args(parser)
    parser.add_argument("--window", type=int, default=256, help="tokens per perplexity window")
    parser.add_argument("--data", nargs="+", required=True, help="held-out text files (the test split)")
    parser.add_argument("--kappa", type=float, nargs="+", default=list(DEFAULT_KAPPAS), help="keep ratios")
    parser.add_argument("--draws", type=int, default=5, help="random draws per κ for a seeded method")
    parser.add_argument("--batch_size", type=int, default=8, help="windows per forward pass")
    parser.add_argument("--max_windows", type=int, default=0, help="score an evenly spaced subset (0: every window)")
    parser.add_argument("--label", default="", help="metric label (default: the method); use one per variant")
    parser.add_argument(
        "--tracking.uri", dest="tracking_uri", default="", help="MLflow store (default sqlite:///<run>/mlflow.db)"
    )
    parser.add_argument("--run_id", default="", help="run to log onto (default <run>/mlflow_run_id)")
    parser.add_argument(
        "--tracking.experiment",
        dest="experiment",
        default="twist-scale",
        help="experiment for a new run when none is found",
    )
    parser.add_argument("--no_mlflow", action="store_true", help="print only")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    setup_logging()
    try:
        for kappa in args.kappa:
            check_kappa(kappa)
        for f in args.data:
            if not Path(f).is_file():
                raise FileNotFoundError(f"test file {f} does not exist; fix --data")
        pruner = pruner_from_args(args)
        run = None if args.no_mlflow else resolve_run(args.central, args.tracking_uri, args.run_id, args.experiment)
        stream = token_stream(args.data, pruner.central.tokenizer)
        result = sweep(
            pruner, stream, args.kappa, args.draws, args.window, args.batch_size, args.label or None, args.max_windows
        )
    except (ValueError, FileNotFoundError) as err:
        parser.exit(2, f"error: {err}\n")
    print(format_sweep(result))
    if args.json:
        args.json.write_text(json.dumps(asdict(result), indent=2))
    if run is not None:
        log_sweep(result, *run)
        print(f"logged to run {run[1]} in {run[0]}")
