"""How a TwIST round's cost grows with the number of groups G and with the model size.

    python bench/scaling.py            # G in {2, 4, 8} on the small Llama; tiny/small/medium at G=2: 10 min here
    python bench/scaling.py --quick    # tiny Llama only: 4.5 min

Every point is one real run under the `deepspeed` launcher with κ = 0.5, 1 rank per group (world =
G processes), every layer partitioned, 4 rounds of H steps; the first round (warm-up) is dropped.
Reported per round: compute seconds, aggregation + dispatch seconds, and the payload each rank
moves (masked reduce-scatter input + all-gather output, fp32), which the trainer logs to MLflow.
This machine has 2 cores: with G > 2 processes share them, so compute per round grows with G here
for lack of cores, not because of TwIST; the aggregation bytes per rank are what carries over to a
cluster. Writes bench/results/scaling{,_quick}.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from measure import RESULTS, launch, round_costs


def point(tmp: Path, name: str, size: str, groups: int, quick: bool) -> dict[str, float]:
    overrides = {
        "model.size": size,
        "twist.groups": groups,
        "twist.kappa": 0.5,
        "twist.shared_layers": "",
        "twist.rounds": 4,
        "twist.local_steps": 3 if quick else 5,
        "data.micro_batch_size": 2 if not quick else 4,
    }
    launch(tmp / name, "tiny_test.toml" if quick else "twist_brown.toml", overrides, procs=groups)
    costs = round_costs(tmp / name) | {"groups": groups, "size": size}
    print(name, json.dumps(costs), flush=True)
    return costs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny model only")
    args = parser.parse_args()
    base = "tiny" if args.quick else "small"
    sizes = ["tiny"] if args.quick else ["tiny", "small", "medium"]
    print(f"configuration: kappa 0.5, 1 rank per group, G sweep {{2, 4, 8}} on {base}, size sweep {sizes} at G=2")
    with tempfile.TemporaryDirectory() as tmp:
        by_groups = [point(Path(tmp), f"{base}_g{g}", base, g, args.quick) for g in (2, 4, 8)]
        by_size = [point(Path(tmp), f"{s}_g2", s, 2, args.quick) for s in sizes if s != base] + [by_groups[0]]
    by_size.sort(key=lambda r: r["full_model_params"])
    report = {"quick": args.quick, "kappa": 0.5, "by_groups": by_groups, "by_size": by_size}
    suffix = "_quick" if args.quick else ""
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
