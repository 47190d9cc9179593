"""Training throughput of TwIST against dense data parallelism on the same processes.

    python bench/throughput.py            # small Llama (~17M), brown, 2 processes, 3 rounds of 15 steps
    python bench/throughput.py --quick    # tiny Llama, seconds

Runs, one after another under the real `deepspeed` launcher on the same 2 processes: dense data
parallel (1 group x 2 ranks) and TwIST kappa=0.5 with 2 groups x 1 rank (paper-style shared layers,
and every layer partitioned). Reads the per-round metrics each run logged to MLflow and writes
bench/results/throughput.{json,md}. The first round includes warm-up and is dropped. The machine
is noisy: read the ratios, not the absolute numbers.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from measure import RESULTS, launch, round_costs

VARIANTS = {
    "dense DP (1x2)": {"twist.groups": 1, "twist.kappa": 1.0},
    "TwIST k=0.5 (2x1), shared 0,1,4,5": {"twist.groups": 2, "twist.kappa": 0.5, "twist.shared_layers": "auto"},
    "TwIST k=0.5 (2x1), all layers partitioned": {"twist.groups": 2, "twist.kappa": 0.5, "twist.shared_layers": ""},
}


def run(out_dir: Path, overrides: dict[str, object], quick: bool) -> dict[str, float]:
    steps = {"twist.rounds": 3, "twist.local_steps": 4 if quick else 15}
    if not quick:  # 'scale', as bench/results/throughput.* were measured: twist_brown.toml's 'mean' sends more
        steps["twist.correction"] = "scale"  # (dispatch sends the output projections whole)
    launch(out_dir, "tiny_test.toml" if quick else "twist_brown.toml", {**steps, **overrides}, procs=2)
    costs = round_costs(out_dir)
    if json.loads((out_dir / "config.json").read_text())["twist"]["groups"] > 1:
        per_token = costs["agg_bytes_per_rank_per_round"] / costs["tokens_per_rank_per_round"]
    else:  # ring all-reduce of fp32 gradients on 2 ranks: each rank sends 2 * (2 - 1) / 2 of them per step
        per_token = costs["full_model_params"] * 4 / (costs["tokens_per_rank_per_round"] / steps["twist.local_steps"])
    return costs | {"bytes_per_token_per_rank": per_token}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny model, a few steps")
    args = parser.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, overrides) in enumerate(VARIANTS.items()):
            results[name] = run(Path(tmp) / f"run{i}", overrides, args.quick)
            print(name, json.dumps(results[name]), flush=True)
    dense = results["dense DP (1x2)"]["tokens_per_s"]
    for r in results.values():
        r["speed_vs_dense"] = r["tokens_per_s"] / dense
    RESULTS.mkdir(parents=True, exist_ok=True)
    suffix = "_quick" if args.quick else ""
    (RESULTS / f"throughput{suffix}.json").write_text(json.dumps({"quick": args.quick, "runs": results}, indent=2))
    lines = [
        "| run | tokens/s | × dense | compute s/round | agg+dispatch s/round | agg share | bytes/token/rank |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, r in results.items():
        lines.append(
            f"| {name} | {r['tokens_per_s']:.0f} | {r['speed_vs_dense']:.2f} | {r['compute_s_per_round']:.2f} | "
            f"{r['agg_s_per_round']:.2f} | {r['agg_share']:.1%} | {r['bytes_per_token_per_rank']:.0f} |"
        )
    (RESULTS / f"throughput{suffix}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
