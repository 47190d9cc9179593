"""`twist-evaluate`: held-out perplexity of the full model and its κ-subnets, logged to the run's MLflow run."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import twist_scale.omp  # noqa: F401  (before torch: OpenMP threads that wait passively)
from twist_scale.commands import parser_for
from twist_scale.commands.export import add_pruning_args, pruner_from_args
from twist_scale.data import token_stream
from twist_scale.evaluate import DEFAULT_KAPPAS, format_sweep, log_sweep, resolve_run, sweep
from twist_scale.logs import setup_logging
from twist_scale.metric_names import check_name, default_test_set
from twist_scale.pruning.methods import check_kappa


def main(argv: list[str] | None = None) -> None:
    """`twist-evaluate RUN/final --data TEST.txt [--kappa ...] [--draws N]`: perplexity vs κ, logged to MLflow."""
    parser = parser_for("twist-evaluate", main.__doc__)
    add_pruning_args(parser)
    parser.add_argument("--window", type=int, default=256, help="tokens per perplexity window")
    parser.add_argument(
        "--data",
        nargs="+",
        action="append",
        required=True,
        help="held-out text files scored as one test set; repeat --data for more test sets (each subnet is "
        "built once for all of them)",
    )
    parser.add_argument(
        "--test_set",
        action="append",
        help="the test set's name in the metrics, one per --data (default: the directory of a test.txt or "
        "valid.txt, e.g. brown, else the file's stem)",
    )
    parser.add_argument(
        "--kappa", "--twist.kappa", type=float, nargs="+", default=list(DEFAULT_KAPPAS), help="keep ratios in (0, 1]"
    )
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
        for f in (f for files in args.data for f in files):
            if not Path(f).is_file():
                raise FileNotFoundError(f"test file {f} does not exist; fix --data")
        names = name_test_sets(args.data, args.test_set)
        pruner = pruner_from_args(args)
        run = None if args.no_mlflow else resolve_run(args.central, args.tracking_uri, args.run_id, args.experiment)
        streams = {
            name: token_stream(files, pruner.central.tokenizer) for name, files in zip(names, args.data, strict=True)
        }
        results = sweep(
            pruner, streams, args.kappa, args.draws, args.window, args.batch_size, args.label or None, args.max_windows
        )
    except (ValueError, FileNotFoundError) as err:
        parser.exit(2, f"error: {err}\n")
    print("\n\n".join(format_sweep(result) for result in results))
    if args.json:
        args.json.write_text(json.dumps([asdict(result) for result in results], indent=2))
    if run is not None:
        for result in results:
            log_sweep(result, *run)
        print(f"logged to run {run[1]} in {run[0]}")


def name_test_sets(data: list[list[str]], given: list[str] | None) -> list[str]:
    """One distinct name per --data: --test_set's, else derived from the files; checked before any scoring."""
    if given is not None and len(given) != len(data):
        raise ValueError(f"{len(given)} --test_set for {len(data)} --data: give one name per --data")
    names = given or [default_test_set(files) for files in data]
    for name in names:
        check_name("--test_set", name)
    if repeated := sorted({n for n in names if names.count(n) > 1}):
        raise ValueError(f"two test sets are named {repeated[0]!r}: name each with --test_set")
    return names
