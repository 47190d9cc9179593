"""`twist-compare`: every evaluated run in one MLflow experiment as a table and a chart of perplexity vs sparsity."""

from __future__ import annotations

from pathlib import Path

from twist_scale.commands import parser_for
from twist_scale.compare import COMPARISON, collect, format_table, log_comparison
from twist_scale.sparsity_chart import plot


def main(argv: list[str] | None = None) -> None:
    """`twist-compare --tracking.uri sqlite:///runs/mlflow.db`: table + PNG of perplexity vs sparsity."""
    parser = parser_for("twist-compare", main.__doc__)
    parser.add_argument(
        "--tracking.uri", dest="tracking_uri", required=True, help="the MLflow store the runs logged to"
    )
    parser.add_argument(
        "--tracking.experiment", dest="experiment", default="twist-scale", help="the experiment to compare"
    )
    parser.add_argument("--out", type=Path, default=Path("runs/compare"), help="directory for the table and PNG")
    parser.add_argument("--no_log", action="store_true", help="do not log the files back to MLflow")
    args = parser.parse_args(argv)
    try:
        series = collect(args.tracking_uri, args.experiment)
    except ValueError as err:
        parser.exit(2, f"error: {err}\n")
    if not series:
        parser.exit(
            2, f"error: no run in {args.experiment!r} has test/*/*/ppl_kappa_* metrics; run launch/evaluate.py\n"
        )
    table = format_table(series)
    print(table)
    table_file = args.out / "ppl_vs_sparsity.md"
    table_file.parent.mkdir(parents=True, exist_ok=True)
    table_file.write_text(table + "\n")
    png = plot(series, args.out / "ppl_vs_sparsity.png", f"{args.experiment}: perplexity vs sparsity")
    print(f"wrote {table_file} and {png}")
    if not args.no_log:
        run_id = log_comparison(args.tracking_uri, args.experiment, [table_file, png])
        print(f"logged to run {run_id} ({COMPARISON})")
