"""Traffic and memory of one TwIST synchronisation, dense against packed, on real engines and gloo.

    python bench/exchange.py            # small Llama, G=2, R in {1, 2}, kappa in {0.25, 0.5, 0.75}: ~4 min
    python bench/exchange.py --quick    # tiny Llama

Per (R, κ, exchange), one dispatch and one aggregation of the whole model with its Adam moments
(optimizer_state = aggregate), on DeepSpeed ZeRO-1 engines (`--zero 3`: ZeRO-3, where dispatch sends
each rank only its shard) in spawned processes on 127.0.0.1:
collectives, payload bytes this rank sent or gathered, seconds, and the peak extra resident memory
during aggregation (Linux VmHWM, reset before, minus VmRSS before; the worst rank; glibc's mmap
threshold is pinned at 64 kB so freed tensors leave the resident set and cannot hide a peak). Bytes are
deterministic; seconds on this 2-core machine are only comparable within one run. Called by
scaling.py, which adds whole-run shares; writes bench/results/exchange{,_quick}{,_bucketNmb}{,_zero3}.{json,md}.
`--bucket_mb 2` makes the small model's largest tensors (8 MB) larger than a bucket.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch.multiprocessing as mp

RESULTS = Path(__file__).resolve().parents[1] / "bench" / "results"
KAPPAS = (0.25, 0.5, 0.75)
GROUPS = 2


def _status_kb(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def _measure(fn, *args) -> tuple[float, int]:  # noqa: ANN001, ANN002
    """(seconds, peak extra resident kB) of fn(*args)."""
    before = _status_kb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start, _status_kb("VmHWM") - before


def _rank(rank: int, world: int, port: int, size: str, bucket_mb: float, zero: int, out: str) -> None:
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    os.environ.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    import torch
    import torch.distributed as dist

    from twist_scale.assembly import central_from_model
    from twist_scale.config import RunConfig
    from twist_scale.correction import correction_of
    from twist_scale.distributed import close_distributed, init_distributed
    from twist_scale.engines.deepspeed_engine import DeepSpeedEngine
    from twist_scale.exchange import FullWidthExchange, PackedExchange
    from twist_scale.models import architecture_of, build_model
    from twist_scale.startup import materialise_rest
    from twist_scale.subnet import SubnetSampler, apply_subnet_shapes, partitioned_blocks
    from twist_scale.sync import SubnetSync
    from twist_scale.topology import Topology

    cfg = RunConfig()
    cfg.parallel.ds_config = str(Path(__file__).resolve().parents[1] / "ds_configs" / f"zero{zero}.json")
    init_distributed(cfg.parallel.backend)
    topo = Topology.from_dist(GROUPS)
    rows = []
    for kappa in KAPPAS:
        with torch.device("meta"):
            model = build_model("llama", size, 4096)
        params = sum(p.numel() for p in model.parameters())
        largest = max(p.numel() for p in model.parameters()) * 4
        unit_blocks = partitioned_blocks(architecture_of(model).unit_blocks(model.config), shared_layers=[])
        specs = SubnetSampler(tuple(unit_blocks), (kappa,) * GROUPS, seed=0).specs(0)
        central = central_from_model(model, topo, seed=0)
        apply_subnet_shapes(model, unit_blocks, specs[topo.group])
        materialise_rest(model)
        engine = DeepSpeedEngine(model, cfg, topo)
        SubnetSync(central, engine, unit_blocks, topo, (), correction_of("scale"), False).dispatch(specs)
        engine.train_step([torch.randint(0, 4096, (1, 32))])  # DeepSpeed creates the Adam moments at the first step
        packed = PackedExchange(central, "fp32", engine.shard_range)
        for name, exchange in (("dense", FullWidthExchange(central)), ("packed", packed)):
            moments = ("exp_avg", "exp_avg_sq")
            sync = SubnetSync(
                central, engine, unit_blocks, topo, moments, correction_of("scale"), False, exchange, bucket_mb
            )
            sync.aggregate(specs)  # the moments exist in the central model from here on, as after round 1
            sync.take_traffic()
            dispatch_s, _ = _measure(sync.dispatch, specs)
            dispatched = sync.take_traffic()
            aggregate_s, extra_kb = _measure(sync.aggregate, specs)
            aggregated = sync.take_traffic()
            row = {
                "R": topo.ranks_per_group,
                "kappa": kappa,
                "exchange": name,
                "params": params,
                "largest_tensor_bytes": largest,
                "bucket_bytes": int(bucket_mb * 2**20),
                "collectives": dispatched.collectives + aggregated.collectives,
                "dispatch_bytes": dispatched.bytes,
                "aggregate_bytes": aggregated.bytes,
                "dispatch_s": dispatch_s,
                "aggregate_s": aggregate_s,
                "aggregate_extra_mb": extra_kb / 1024,
            }
            gathered = [None] * world
            dist.all_gather_object(gathered, row)
            if rank == 0:
                rows.append(_worst(gathered))
        del engine, central
    if rank == 0:
        Path(out).write_text(json.dumps(rows))
    close_distributed()


def _worst(per_rank: list[dict]) -> dict:
    """Every rank's figures reduced to the largest (bytes are equal up to piece rounding)."""
    row = dict(per_rank[0])
    for key in ("collectives", "dispatch_bytes", "aggregate_bytes", "dispatch_s", "aggregate_s", "aggregate_extra_mb"):
        row[key] = max(r[key] for r in per_rank)
    return row


def measure(size: str, bucket_mb: float, tmp: Path, zero: int = 1) -> list[dict]:
    """Rows for R = 1 and R = 2 (G = 2), each from one spawned world."""
    from twist_scale.distributed import free_port

    os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"  # read by glibc when each spawned rank starts
    rows = []
    for ranks_per_group in (1, 2):
        world, out = GROUPS * ranks_per_group, tmp / f"exchange_r{ranks_per_group}.json"
        mp.start_processes(
            _rank, args=(world, free_port(), size, bucket_mb, zero, str(out)), nprocs=world, start_method="spawn"
        )
        rows += json.loads(out.read_text())
    return rows


def table(rows: list[dict]) -> str:
    lines = [
        "| R | κ | exchange | collectives/round | dispatch MB/rank | aggregate MB/rank | bytes/param/rank "
        "| vs dense | dispatch s | aggregate s | aggregation extra MB |",
        "| ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    dense = {(r["R"], r["kappa"]): r for r in rows if r["exchange"] == "dense"}
    for r in rows:
        total = r["dispatch_bytes"] + r["aggregate_bytes"]
        ref = dense[(r["R"], r["kappa"])]
        lines.append(
            f"| {r['R']} | {r['kappa']:.2f} | {r['exchange']} | {r['collectives']} | {r['dispatch_bytes'] / 1e6:.1f} | "
            f"{r['aggregate_bytes'] / 1e6:.1f} | {total / r['params']:.1f} | "
            f"{total / (ref['dispatch_bytes'] + ref['aggregate_bytes']):.2f} | {r['dispatch_s']:.2f} | "
            f"{r['aggregate_s']:.2f} | {r['aggregate_extra_mb']:.0f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    import tempfile

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny model")
    parser.add_argument("--bucket_mb", type=float, default=32.0)
    parser.add_argument("--zero", type=int, choices=(1, 3), default=1, help="ZeRO stage of the groups' engines")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        rows = measure("tiny" if args.quick else "small", args.bucket_mb, Path(tmp), args.zero)
    suffix = ("_quick" if args.quick else "") + (f"_bucket{args.bucket_mb:g}mb" if args.bucket_mb != 32 else "")
    suffix += "_zero3" if args.zero == 3 else ""
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"exchange{suffix}.json").write_text(json.dumps(rows, indent=2))
    (RESULTS / f"exchange{suffix}.md").write_text(table(rows))
    print(table(rows))


if __name__ == "__main__":
    main()
