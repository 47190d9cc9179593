"""Run on 4 ranks (one group) by `helpers.dist.run_on_ranks`: engines built from a TwIST subnet on the
meta device allocate only what the rank keeps, counted by `helpers.allocations.HostTensorBytes`."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from helpers import REPO
from helpers.allocations import HostTensorBytes

from twist_scale.assembly import central_from_model
from twist_scale.config import RunConfig
from twist_scale.engines import build_engine
from twist_scale.run_model import build_run_model
from twist_scale.startup import blocks
from twist_scale.subnet import SubnetSampler, apply_subnet_shapes
from twist_scale.topology import Topology

VOCAB = 4096


def check_build_peak(rank: int, world: int, engine: str, directory: str) -> None:
    """The engine's build holds at most the rank's shards and one block at once (ZeRO-3: DeepSpeed's
    three partition-sized buffers: the partition, its fp32 master, its gradient); then it trains."""
    topo = Topology.from_dist(1)
    cfg = RunConfig()
    cfg.model.size, cfg.parallel.engine = "medium", "deepspeed" if engine == "zero3" else engine
    cfg.optim.name, cfg.optim.beta1, cfg.data.micro_batch_size = "sgd", 0, 1
    ds_config = json.loads((REPO / "ds_configs" / "zero3.json").read_text())  # small buckets: counted too
    ds_config["zero_optimization"] |= {"reduce_bucket_size": 2**18, "stage3_prefetch_bucket_size": 2**18}
    cfg.parallel.ds_config = str(Path(directory) / f"zero3_rank{rank}.json")
    Path(cfg.parallel.ds_config).write_text(json.dumps(ds_config))
    run_model = build_run_model(cfg, VOCAB)
    model = run_model.model
    central_from_model(model, topo, cfg.seed)  # as start-up does: the model's parameters go back to meta
    apply_subnet_shapes(model, run_model.unit_blocks, SubnetSampler(tuple(run_model.unit_blocks), (1.0,), 0).specs(0)[0])
    assert all(p.is_meta for p in model.parameters())
    subnet = sum(p.numel() for p in model.parameters()) * 4
    block = max(sum(t.numel() for t in b.parameters(recurse=whole)) * 4 for _, b, whole in blocks(model))

    with HostTensorBytes() as counted:
        built = build_engine(model, cfg, topo)
    shard = subnet / world
    kept = shard if engine == "fsdp" else 3 * shard
    buffers = 4 * 2**18 * 4  # ZeRO-3's reduce and prefetch buckets, fp32
    assert counted.peak <= kept + block + buffers, (
        f"{engine}: the build held {counted.peak / 2**20:.0f} MiB at once; the subnet is {subnet / 2**20:.0f} MiB, "
        f"this rank keeps {kept / 2**20:.0f} MiB, one block is {block / 2**20:.0f} MiB"
    )

    values = torch.Generator().manual_seed(0)  # as the first dispatch does: every value written, then a step
    for name in sorted(built.storage.params):
        built.storage.write(name, torch.randn(built.storage.read(name).shape, generator=values) * 0.02)
    loss = built.train_step([torch.randint(0, VOCAB, (1, 64), generator=values)])
    assert 7 < loss < 10, f"{engine}: loss {loss} of a random model over {VOCAB} tokens (ln {VOCAB} = 8.3)"
