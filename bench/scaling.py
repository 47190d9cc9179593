"""How a TwIST round's cost grows with G and the model size, and what the packed exchange saves.

    python bench/scaling.py                      # both sections below: ~25 min here
    python bench/scaling.py --section groups     # G in {2, 4, 8} on the small Llama; tiny/small/medium at G=2
    python bench/scaling.py --section exchange   # dense against packed synchronisation: ~12 min
    python bench/scaling.py --quick              # the tiny Llama only

Section 'exchange', old (dense) against new (packed) synchronisation, in one run:
- per R in {1, 2} and κ in {0.25, 0.5, 0.75}: collectives, bytes per rank and peak extra memory of one
  dispatch and aggregation on real engines (bench/exchange.py);
- whole training runs (small Llama, G = 2, κ = 0.5, 1 rank per group, Adam moments aggregated) at
  H = 5 and H = 15 for each exchange, and packed with a bf16 wire at H = 15: synchronisation share of
  wall time, bytes per trained token, collectives per round, start-up peak RSS of rank 0, and the
  final validation perplexity (what a bf16 wire costs).

Section 'groups':

Every point is one real run under the `deepspeed` launcher with κ = 0.5, 1 rank per group (world =
G processes), every layer partitioned, 4 rounds of H steps; the first round (warm-up) is dropped.
Reported per round: compute seconds, aggregation + dispatch seconds, and the payload each rank
moves (masked reduce-scatter input + all-gather output, fp32), which the trainer logs to MLflow.
This machine has 2 cores: with G > 2 processes share them, so compute per round grows with G here
for lack of cores, not because of TwIST; the aggregation bytes per rank are what carries over to a
cluster. Writes bench/results/scaling{,_quick}.{json,md} and scaling_exchange{,_quick}.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import exchange
from measure import RESULTS, launch, round_costs

# dense all-reduce data parallelism moves 2 (W-1)/W x 4 bytes per parameter per step: with W = 2, 4 bytes
DENSE_ALLREDUCE_BYTES_PER_PARAM_STEP = 4.0


def point(tmp: Path, name: str, size: str, groups: int, quick: bool) -> dict[str, float]:
    overrides = {
        "model.size": size,
        "twist.groups": groups,
        "twist.kappa": 0.5,
        "twist.correction": "scale",  # what the published figures were measured with
        "twist.shared_layers": "",
        "twist.rounds": 4,
        "twist.local_steps": 3 if quick else 5,
        "data.micro_batch_size": 2 if not quick else 4,
    }
    launch(tmp / name, "tiny_test.toml" if quick else "twist_brown.toml", overrides, procs=groups)
    costs = round_costs(tmp / name) | {"groups": groups, "size": size}
    print(name, json.dumps(costs), flush=True)
    return costs


def run_point(tmp: Path, quick: bool, local_steps: int, aggregation: str, wire: str = "fp32") -> dict:
    """One whole run at G = 2, κ = 0.5, R = 1 with the given exchange."""
    name = f"h{local_steps}_{aggregation}_{wire}"
    overrides = {
        "model.size": "tiny" if quick else "small",
        "twist.groups": 2,
        "twist.kappa": 0.5,
        "twist.correction": "scale",  # what the published figures were measured with
        "twist.shared_layers": "",
        "twist.rounds": 4,
        "twist.local_steps": local_steps,
        "twist.aggregation": aggregation,
        "twist.wire_dtype": wire,
    }
    launch(tmp / name, "tiny_test.toml" if quick else "twist_brown.toml", overrides, procs=2)
    costs = round_costs(tmp / name) | {"H": local_steps, "exchange": aggregation, "wire": wire}
    costs["bytes_per_token"] = costs["agg_bytes_per_rank_per_round"] / costs["tokens_per_rank_per_round"]
    costs["dense_allreduce_bytes_per_token"] = (
        DENSE_ALLREDUCE_BYTES_PER_PARAM_STEP
        * costs["full_model_params"]
        * local_steps
        / costs["tokens_per_rank_per_round"]
    )
    print(name, json.dumps(costs), flush=True)
    return costs


def exchange_section(quick: bool) -> None:
    suffix = "_quick" if quick else ""
    with tempfile.TemporaryDirectory() as tmp:
        grid = exchange.measure("tiny" if quick else "small", 32.0, Path(tmp))
        runs = [run_point(Path(tmp), quick, h, a) for h in (5, 15) for a in ("dense", "packed")]
        runs.append(run_point(Path(tmp), quick, 15, "packed", "bf16"))
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"scaling_exchange{suffix}.json").write_text(json.dumps({"grid": grid, "runs": runs}, indent=2))
    lines = [
        "| H | exchange | wire | collectives/round | sync share | sync s/round | kB/token/rank | × dense all-reduce "
        "| start-up peak RSS MB | final val ppl |",
        "| ---: | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in runs:
        lines.append(
            f"| {r['H']} | {r['exchange']} | {r['wire']} | {r['collectives_per_round']:.0f} | {r['agg_share']:.1%} | "
            f"{r['agg_s_per_round']:.2f} | {r['bytes_per_token'] / 1e3:.2f} | "
            f"{r['bytes_per_token'] / r['dense_allreduce_bytes_per_token']:.2f} | {r['startup_peak_rss_mb']:.0f} | "
            f"{r['final_eval_ppl']:.2f} |"
        )
    text = exchange.table(grid) + "\n" + "\n".join(lines) + "\n"
    (RESULTS / f"scaling_exchange{suffix}.md").write_text(text)
    print(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny model only")
    parser.add_argument("--section", choices=["groups", "exchange", "all"], default="all")
    args = parser.parse_args()
    if args.section in ("exchange", "all"):
        exchange_section(args.quick)
    if args.section in ("groups", "all"):
        groups_section(args.quick)


def groups_section(quick: bool) -> None:
    base = "tiny" if quick else "small"
    sizes = ["tiny"] if quick else ["tiny", "small", "medium"]
    print(f"configuration: kappa 0.5, 1 rank per group, G sweep {{2, 4, 8}} on {base}, size sweep {sizes} at G=2")
    with tempfile.TemporaryDirectory() as tmp:
        by_groups = [point(Path(tmp), f"{base}_g{g}", base, g, quick) for g in (2, 4, 8)]
        by_size = [point(Path(tmp), f"{s}_g2", s, 2, quick) for s in sizes if s != base] + [by_groups[0]]
    by_size.sort(key=lambda r: r["full_model_params"])
    report = {"quick": quick, "kappa": 0.5, "by_groups": by_groups, "by_size": by_size}
    suffix = "_quick" if quick else ""
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"scaling{suffix}.json").write_text(json.dumps(report, indent=2))
    header = [
        "| model | params | G (= processes) | compute s/round | agg+dispatch s/round | agg share | MB/rank/round "
        "| bytes/param/rank |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    rows = []
    for r in by_groups + [r for r in by_size if r is not by_groups[0]]:
        rows.append(
            f"| {r['size']} | {r['full_model_params']:,} | {r['groups']} | {r['compute_s_per_round']:.2f} | "
            f"{r['agg_s_per_round']:.2f} | {r['agg_share']:.1%} | {r['agg_bytes_per_rank_per_round'] / 1e6:.1f} | "
            f"{r['agg_bytes_per_rank_per_round'] / r['full_model_params']:.1f} |"
        )
    table = "\n".join(header + rows) + "\n"
    (RESULTS / f"scaling{suffix}.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
