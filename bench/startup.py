"""Start-up memory of one TwIST rank: the whole model built then cut (before) against block by block (now).

    python bench/startup.py            # small and medium Llama, rank 0 of G=2 x R=2, κ = 0.5: ~1 min

Each cell runs in a fresh spawned process (peak RSS is per process) and reports its peak resident
memory above what the imports took, once the rank holds its central pieces and its group's (still
empty) subnet, which is what it keeps before the engine is built:
  - whole model: build the full-width model with its weights, cut this rank's pieces from every tensor,
    then shrink the model to the subnet (how every rank started before `startup.py`);
  - block by block: the model on the meta device, filled one block at a time, each block's pieces kept
    and the block released (`assembly.central_from_model`), then the subnet materialised.
Writes bench/results/startup.{json,md}.
"""

from __future__ import annotations

import json
import math
import multiprocessing as mp
import resource
from pathlib import Path

RESULTS = Path(__file__).resolve().parents[1] / "bench" / "results"
SIZES = ("small", "medium")
WAYS = ("whole model", "block by block")


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports kB


def _start(size: str, way: str, queue: mp.Queue) -> None:
    import torch

    from twist_scale.assembly import central_from_model, central_tensors
    from twist_scale.central import CentralShards
    from twist_scale.models import architecture_of, build_model
    from twist_scale.startup import materialise_rest
    from twist_scale.subnet import SubnetSampler, apply_subnet_shapes, partitioned_blocks
    from twist_scale.topology import Topology

    topo = Topology(world_size=4, rank=0, groups=2)
    baseline = _peak_mb()
    if way == "whole model":
        torch.manual_seed(0)
        model = build_model("llama", size, 4096)
        central = CentralShards(topo, {n: t.shape for n, t in central_tensors(model).items()})
        for name, tensor in central_tensors(model).items():
            central.set_full(name, tensor.detach())
    else:
        with torch.device("meta"):
            model = build_model("llama", size, 4096)
        central = central_from_model(model, topo, seed=0)
    unit_blocks = partitioned_blocks(architecture_of(model).unit_blocks(model.config), shared_layers=[])
    apply_subnet_shapes(model, unit_blocks, SubnetSampler(tuple(unit_blocks), (0.5,) * 2, seed=0).specs(0)[0])
    materialise_rest(model)
    full_mb = sum(math.prod(s) for s in central.shapes.values()) * 4 / 2**20
    queue.put({"size": size, "way": way, "full_model_mb": full_mb, "startup_mb": _peak_mb() - baseline})


def main() -> None:
    ctx = mp.get_context("spawn")
    rows = []
    for size in SIZES:
        for way in WAYS:
            queue = ctx.Queue()
            proc = ctx.Process(target=_start, args=(size, way, queue))
            proc.start()
            rows.append(queue.get())
            proc.join()
    lines = [
        "| model | full fp32 MB | whole model, then cut: peak MB | block by block: peak MB | ratio |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for size in SIZES:
        before, now = (next(r for r in rows if r["size"] == size and r["way"] == way) for way in WAYS)
        lines.append(
            f"| {size} | {before['full_model_mb']:.0f} | {before['startup_mb']:.0f} | {now['startup_mb']:.0f} | "
            f"{now['startup_mb'] / before['startup_mb']:.2f} |"
        )
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "startup.json").write_text(json.dumps(rows, indent=2))
    (RESULTS / "startup.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
