"""`twist-export`: one dense checkpoint per κ (and seed) of a trained central model; flags export and
evaluate share."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from twist_scale.commands import parser_for
from twist_scale.logs import setup_logging
from twist_scale.pruning.calibration import calibration_from_files
from twist_scale.pruning.methods import METHODS, PruneMethod, check_kappa, method
from twist_scale.pruning.pruner import Pruner, SavedCentral, build_pruner, export_subnet

log = logging.getLogger(__name__)


def add_pruning_args(parser: argparse.ArgumentParser) -> None:
    """Flags shared by export and evaluate: which subnet, which correction, which calibration text."""
    parser.add_argument("central", type=Path, help="central model directory (a run's final/)")
    parser.add_argument("--method", default="random", help=f"pruning method: {', '.join(METHODS)}")
    parser.add_argument("--shared_layers", default="auto", help="'auto' (as trained), 'none', or e.g. '0,1,4,5'")
    parser.add_argument("--correction", default="auto", help="'auto', 'none', 'scale' or 'mean'")
    parser.add_argument("--calibration", nargs="*", default=None, help="calibration text (default: training files)")
    parser.add_argument(
        "--calibration_samples", type=int, default=None, help="calibration windows (default: the method's reference)"
    )
    parser.add_argument(
        "--calibration_window", type=int, default=None, help="tokens per calibration window (default: as above)"
    )


def calibration_setting(chosen: PruneMethod, samples: int | None, window: int | None) -> tuple[int, int]:
    """(windows, tokens each): the method's reference setting unless the flags say otherwise."""
    return samples or chosen.calibration[0], window or chosen.calibration[1]


def pruner_from_args(args: argparse.Namespace) -> Pruner:
    central = SavedCentral.load(args.central)
    calibration = None
    chosen = method(args.method)
    if chosen.calibrated:
        files = args.calibration or central.calibration_text_files()
        samples, window = calibration_setting(chosen, args.calibration_samples, args.calibration_window)
        calibration = calibration_from_files(files, central.tokenizer, samples, window)
    return build_pruner(central, args.method, args.shared_layers, args.correction, calibration)


def main(argv: list[str] | None = None) -> None:
    """`twist-export RUN/final --kappa 0.75 0.5 0.25 --out exports/`: one dense checkpoint per κ (and seed)."""
    parser = parser_for("twist-export", main.__doc__)
    add_pruning_args(parser)
    parser.add_argument("--kappa", "--twist.kappa", type=float, nargs="+", required=True, help="keep ratios in (0, 1]")
    parser.add_argument("--seed", type=int, nargs="+", default=[0], help="draws of a seeded method (random)")
    parser.add_argument("--out", type=Path, required=True, help="parent directory of the exports")
    args = parser.parse_args(argv)
    setup_logging()
    try:
        for kappa in args.kappa:
            check_kappa(kappa)
        pruner = pruner_from_args(args)
    except (ValueError, FileNotFoundError) as err:
        parser.exit(2, f"error: {err}\n")
    for kappa in args.kappa:
        for seed in args.seed if pruner.method.seeded else [0]:
            path = export_subnet(pruner, args.out, kappa, seed)
            log.info("kappa %.2f seed %d -> %s", kappa, seed, path)
            print(path)
