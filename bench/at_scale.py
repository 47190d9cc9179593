"""One rank of a large TwIST run, measured on this machine: start-up, sampling, engine build, checkpoint,
elastic resume and the exchange, with the real code on a meta-device model and a fake process group of
the run's world size.

    python bench/at_scale.py                       # llama 70b and 8b, W = 4,096 and 512: ~9 min
    python bench/at_scale.py --shape llama-70b --world 4096 --groups 64 --kappa 0.25 --json OUT

torch's 'fake' process group lets one process be rank r of W: its collectives return at once (their
tensors keep whatever they held), so CPU seconds and bytes are one rank's own share of the work, the
network's time aside. The pretrained checkpoint is a stub that serves any slice of any tensor as bf16
zeros and counts the bytes asked for: reads are what a rank would read from the file system. Memory
is counted by torch itself (live host tensor bytes, `HostTensorBytes`), not the resident set.

What each figure is, per rank, and the code it runs:
  - start-up: `assembly.central_from_model` from the stub checkpoint (its central pieces, read with
    slices): CPU s, bytes read, peak tensor bytes;
  - sampling: `SubnetSampler.specs` for one round, every group's spec (as every rank draws them): the
    second round's, as every round after the first pays; the first also imports and loads the compiled
    draw, once per process (reported apart);
  - engine build: `build_engine` on the group's κ-subnet from the meta device, FSDP2 and ZeRO-3 (with
    ds_configs/zero3.json, whose DeepSpeed defaults include a 2 GB reduce bucket): peak tensor bytes;
  - checkpoint: this rank's central shards and two moments written with `torch.save` and hashed
    (`checkpoint_manifest._sha256`), as each rank does: bytes, CPU s;
  - elastic resume to half the world: `CentralShards.load_resharded` over the old ranks' pieces
    (stubbed): old rank files a new rank opens;
  - the exchange: one round of aggregation and dispatch (weights and Adam moments, correction `none`
    and `mean`) through the real `SubnetSync` and `PackedExchange`, with an engine that stores what
    FSDP2 would store (`exchange_at_scale.py`): CPU s, split into the plan, the owners' row and column
    indices and the payloads; bytes and collectives; metadata. The previous exchange runs on 6 of its buckets and is
    extrapolated.
Before (the code of the previous release, by construction): every rank read the whole checkpoint,
built the whole subnet on the device, and opened all W_old rank files on an elastic resume; sampling
and the exchange before are the previous release's code itself (from git, `exchange_at_scale.PREVIOUS`).
Writes bench/results/at_scale.{json,md} (a single shape: only --json OUT).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import exchange_at_scale
import torch
import torch.distributed as dist
from at_scale_stubs import OldRanks, StubCheckpoint
from measure import REPO, RESULTS

sys.path.insert(0, str(REPO / "tests"))
from helpers.allocations import HostTensorBytes  # noqa: E402 - the tests' counter, on the tests' path

from twist_scale import startup  # noqa: E402
from twist_scale.assembly import central_from_model  # noqa: E402
from twist_scale.central import CentralShards  # noqa: E402
from twist_scale.checkpoint_manifest import _sha256  # noqa: E402
from twist_scale.config import RunConfig  # noqa: E402
from twist_scale.engines import build_engine  # noqa: E402
from twist_scale.run_model import build_run_model  # noqa: E402
from twist_scale.subnet import SubnetSampler, apply_subnet_shapes  # noqa: E402
from twist_scale.topology import Topology  # noqa: E402

VOCAB = 128256  # Llama 3's
CASES = [("70b", 4096, 64), ("70b", 512, 8), ("8b", 4096, 64), ("8b", 512, 8)]  # (shape, W, G)


def cpu_seconds(since: float) -> float:
    return time.process_time() - since


def one_rank(shape: str, world: int, groups: int, kappa: float, rank: int) -> dict[str, float]:
    from torch.testing._internal.distributed.fake_pg import FakeStore

    os.environ.setdefault("LOCAL_RANK", "0")  # as a launcher sets it (deepspeed.zero.Init reads it)
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world)
    topo = Topology.from_dist(groups)
    topo.device = torch.device("cpu")  # the fake group serves any device; this machine computes on the host
    cfg = RunConfig()
    cfg.model.size, cfg.parallel.engine, cfg.twist.groups, cfg.twist.kappa = shape, "fsdp", groups, kappa
    cfg.twist.allow_uncovered, cfg.twist.correction = True, "mean"
    run_model = build_run_model(cfg, VOCAB)
    model = run_model.model
    shapes = {name: p.shape for name, p in model.named_parameters()}
    full_bytes_bf16 = sum(s.numel() for s in shapes.values()) * 2
    out: dict[str, float] = {"parameters": sum(s.numel() for s in shapes.values()), "world": world, "groups": groups}

    stub = StubCheckpoint(shapes)
    with (
        contextlib.ExitStack() as patches,
        HostTensorBytes() as counted,
    ):
        patches.enter_context(_patched(startup, "pretrained_files", lambda _: dict.fromkeys(shapes, "stub")))
        patches.enter_context(_patched(startup, "safe_open", lambda *_: contextlib.nullcontext(stub)))
        start = time.process_time()
        central = central_from_model(model, topo, cfg.seed, pretrained="stub")
        out["startup_cpu_s"] = cpu_seconds(start)
    out["startup_read_mb"] = stub.bytes_read / 1e6
    out["startup_read_before_mb"] = full_bytes_bf16 / 1e6
    out["startup_peak_mb"] = counted.peak / 1e6
    out["central_shard_mb"] = sum(t.numel() for t in central.shards.values()) * 4 / 1e6

    start = time.process_time()
    sampler = SubnetSampler(tuple(run_model.unit_blocks), cfg.twist.kappas, cfg.seed)
    sampler.specs(0)
    out["sampling_first_cpu_s"] = cpu_seconds(start)  # once per process: numba's import and compiled draw
    start = time.process_time()
    specs = sampler.specs(1)
    out["sampling_cpu_s"] = cpu_seconds(start)

    for engine, ds_config in (("fsdp", ""), ("zero3", str(REPO / "ds_configs" / "zero3.json"))):
        cfg.parallel.engine, cfg.parallel.ds_config = "fsdp" if engine == "fsdp" else "deepspeed", ds_config
        subnet = build_run_model(cfg, VOCAB).model  # a fresh meta-device model for each engine
        apply_subnet_shapes(subnet, run_model.unit_blocks, specs[topo.group])
        subnet_bytes = sum(p.numel() for p in subnet.parameters()) * 4
        with HostTensorBytes() as counted:
            start = time.process_time()
            built = build_engine(subnet, cfg, topo)
            out[f"{engine}_build_cpu_s"] = cpu_seconds(start)
        out[f"{engine}_build_peak_mb"] = counted.peak / 1e6
        del built, subnet
    out["engine_build_before_mb"] = subnet_bytes / 1e6  # the whole subnet, fp32
    out["subnet_shard_mb"] = subnet_bytes / topo.ranks_per_group / 1e6

    state = {"central": central.shards} | {
        f"moment{i}": {n: torch.zeros_like(t) for n, t in central.shards.items()} for i in range(2)
    }
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / f"rank_{rank:05d}.pt"
        start = time.process_time()
        torch.save(state, path)
        _sha256(path)
        out["checkpoint_cpu_s"] = cpu_seconds(start)
        out["checkpoint_written_mb"] = path.stat().st_size / 1e6
    del state

    new_world = world // 2
    old_ranks = OldRanks({name: s for name, s in central.shapes.items()}, world)
    CentralShards(Topology(new_world, rank % new_world, groups // 2), central.shapes).load_resharded(old_ranks, world)
    out["elastic_files_opened"] = len(old_ranks.opened)
    out["elastic_files_before"] = world
    return out | exchange_at_scale.measure(central, run_model.unit_blocks, specs, topo, cfg.twist.kappas, cfg.seed)


@contextlib.contextmanager
def _patched(module: object, name: str, value: object) -> Iterator[None]:
    old = getattr(module, name)
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, old)


def derived(result: dict[str, float]) -> dict[str, float]:
    """Totals for the table: a round's CPU (sampling + both phases), the previous exchange's dispatch bytes
    (today's, with the output projections it sent whole in place of their κ/R share)."""
    result["round_cpu_s"] = result["sampling_cpu_s"] + result["aggregate_cpu_s_mean"] + result["dispatch_cpu_s_mean"]
    previous = result["previous_aggregate_cpu_s"] + result["previous_dispatch_cpu_s"]
    result["previous_round_cpu_s"] = result["previous_sampling_cpu_s"] + previous
    result["previous_dispatch_mean_mb"] = result["dispatch_mb_none"] + result["previous_dispatch_whole_outputs_mb"]
    result["collectives"] = f"{result['collectives_none']} / {result['collectives_mean']}"
    phases = result["aggregate_cpu_s_mean"] + result["dispatch_cpu_s_mean"]
    result["payload_cpu_s_mean"] = phases - result["plan_cpu_s_mean"] - result["offsets_cpu_s_mean"]
    result["plan_and_sampling_cpu_s"] = result["sampling_cpu_s"] + result["plan_cpu_s_mean"]
    return result


def table(results: list[dict[str, float]]) -> str:
    rows = [
        ("start-up CPU s", "startup_cpu_s", None),
        ("start-up read MB (bf16 checkpoint)", "startup_read_mb", "startup_read_before_mb"),
        ("start-up peak tensor MB", "startup_peak_mb", None),
        ("central shards MB (fp32)", "central_shard_mb", None),
        ("sampling CPU s (one round, all G specs)", "sampling_cpu_s", None),
        ("  the first round (with numba's import, once per process)", "sampling_first_cpu_s", None),
        ("engine build peak MB (FSDP2)", "fsdp_build_peak_mb", "engine_build_before_mb"),
        ("engine build peak MB (ZeRO-3)", "zero3_build_peak_mb", "engine_build_before_mb"),
        ("subnet shard MB (fp32)", "subnet_shard_mb", None),
        ("checkpoint written MB", "checkpoint_written_mb", None),
        ("checkpoint write + hash CPU s", "checkpoint_cpu_s", None),
        ("elastic resume to W/2: old files opened", "elastic_files_opened", "elastic_files_before"),
        ("sampling + exchange CPU s (one round, correction mean)", "round_cpu_s", "previous_round_cpu_s"),
        ("  aggregation CPU s", "aggregate_cpu_s_mean", "previous_aggregate_cpu_s"),
        ("  dispatch CPU s (with the mean shifts)", "dispatch_cpu_s_mean", "previous_dispatch_cpu_s"),
        ("  of which the plan: splits and ranges (W × entries)", "plan_cpu_s_mean", None),
        ("  of which owners' row and column indices of their pieces (`piece_rows`)", "offsets_cpu_s_mean", None),
        ("  of which payloads: reads, gathers, sums (∝ bytes moved)", "payload_cpu_s_mean", None),
        ("sampling + plan CPU s", "plan_and_sampling_cpu_s", None),
        ("exchange metadata MB", "exchange_metadata_mb", "previous_metadata_mb"),
        ("all G specs MB (int64 unit ids + the (G, n) bool draw)", "specs_mb", None),
        ("aggregation MB sent (weights + 2 moments)", "aggregate_mb_mean", None),
        ("dispatch MB received, correction none", "dispatch_mb_none", None),
        ("dispatch MB received, correction mean", "dispatch_mb_mean", "previous_dispatch_mean_mb"),
        ("collectives per round (none / mean)", "collectives", None),
    ]
    head = " | ".join(f"{r['shape']} W={r['world']} G={r['groups']}" for r in results)
    lines = [f"| per rank, κ = {results[0]['kappa']} | {head} |", "| --- |" + " ---: |" * len(results)]
    for label, key, before in rows:
        cells = []
        for r in results:
            value = r[key]
            cell = f"{value:,.1f}" if isinstance(value, float) else f"{value:,}" if isinstance(value, int) else value
            cells.append(cell + (f" (before {r[before]:,.1f})" if before else ""))
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--shape", choices=["8b", "70b", "llama-8b", "llama-70b"], help="one case (default: every case in CASES)"
    )
    parser.add_argument("--world", type=int, default=4096)
    parser.add_argument("--groups", type=int, default=64)
    parser.add_argument("--kappa", type=float, default=0.25)
    parser.add_argument("--rank", type=int, help="which rank to be (default: the middle one)")
    parser.add_argument("--json", type=Path, help="write this case's figures here")
    args = parser.parse_args()
    if args.shape:
        args.shape = args.shape.removeprefix("llama-")
        rank = args.world // 2 + 1 if args.rank is None else args.rank
        result = {"shape": args.shape, "kappa": args.kappa, "rank": rank}
        result |= one_rank(args.shape, args.world, args.groups, args.kappa, rank)
        print(json.dumps(result))
        if args.json:
            args.json.write_text(json.dumps(result, indent=2))
        return
    results = []
    for shape, world, groups in CASES:  # each in its own process: a fake world is one per process
        cmd = [sys.executable, __file__, "--shape", shape, "--world", str(world), "--groups", str(groups)]
        cmd += ["--kappa", str(args.kappa)]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        results.append(derived(json.loads(out.strip().splitlines()[-1])))
        print(results[-1], flush=True)
    (RESULTS / "at_scale.json").write_text(json.dumps(results, indent=2))
    md = "# One rank at scale — `python bench/at_scale.py`\n\n" + table(results)
    (RESULTS / "at_scale.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
