"""Start-up memory: what a rank holds once its model, central pieces and engine are built.

    python bench/startup.py            # small and medium Llama, dense and TwIST (G=2, κ=0.5): ~4 min

One real run per cell under `deepspeed` (2 ranks, one round of one step, ZeRO-1), reading rank 0's
`perf/startup_peak_rss_mb` (peak RSS after the model, the central pieces and the engine are built).
A dense rank fills the whole model, as its engine trains it; a TwIST rank builds the model on the meta
device and keeps, block by block, only its central pieces and its group's subnet. The difference in
one run is what sharded start-up saves; imports (torch, DeepSpeed, transformers) are the same in
both. Writes bench/results/startup.{json,md}.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from measure import RESULTS, launch, round_costs

SIZES = ("small", "medium")


def measure(size: str, groups: int, out: Path) -> float:
    overrides = {
        "model.size": size,
        "twist.groups": groups,
        "twist.kappa": 0.5 if groups > 1 else 1.0,
        "twist.correction": "scale" if groups > 1 else "none",
        "twist.rounds": 2,  # round_costs drops the first round
        "twist.local_steps": 1,
        "data.micro_batch_size": 1,
    }
    run = out / f"{size}_g{groups}"
    launch(run, "twist_brown.toml" if groups > 1 else "dense_brown.toml", overrides, procs=2)
    return round_costs(run)["startup_peak_rss_mb"]


def main() -> None:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for size in SIZES:
            dense, twist = measure(size, 1, Path(tmp)), measure(size, 2, Path(tmp))
            rows.append({"size": size, "dense_mb": dense, "twist_mb": twist, "saved_mb": dense - twist})
    lines = ["| model | dense rank MB | TwIST rank MB | saved MB |", "| --- | ---: | ---: | ---: |"]
    lines += [f"| {r['size']} | {r['dense_mb']:.0f} | {r['twist_mb']:.0f} | {r['saved_mb']:.0f} |" for r in rows]
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "startup.json").write_text(json.dumps(rows, indent=2))
    (RESULTS / "startup.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
