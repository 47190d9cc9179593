"""Run on 2 ranks by `helpers.dist.run_on_ranks`: DeepSpeed engine behaviour TwIST relies on.

1. write() reaches the weights the forward uses and survives the next step, for ZeRO 0-3
   (the ZeRO trap: setting only the fp32 master, or only p.data, is silently wrong);
2. optimizer moments round-trip through write_state/read_state; each rank's read_shard is exactly
   its shard (shard_of) of the full weights and moments, and the ranks' ranges tile every parameter;
3. ZeRO stages 1-3 follow stage 0's loss trajectory;
4. a rank that computed different masks is caught by the hash check.
"""

from __future__ import annotations

import pytest
import torch
from helpers import REPO

from twist_scale.config import RunConfig
from twist_scale.engines.deepspeed_engine import DeepSpeedEngine
from twist_scale.models import architecture_of, build_model
from twist_scale.subnet import SubnetSampler, partitioned_blocks
from twist_scale.sync import verify_same_masks
from twist_scale.run_model import parameter_count
from twist_scale.topology import Topology

VOCAB = 64


def batches(rank: int, n: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(100 + rank)
    return [torch.randint(0, VOCAB, (2, 16), generator=g) for _ in range(n)]


def engine_for(stage: int, topo: Topology, optim: str = "adamw") -> DeepSpeedEngine:
    torch.manual_seed(0)
    cfg = RunConfig()
    cfg.parallel.ds_config = str(REPO / "ds_configs" / f"zero{stage}.json")
    cfg.optim.name, cfg.optim.lr, cfg.optim.warmup_steps = optim, 1e-3, 0
    cfg.data.micro_batch_size = 2
    return DeepSpeedEngine(build_model("llama", "tiny", VOCAB), cfg, topo)


def check_write(stage: int, topo: Topology) -> None:
    engine = engine_for(stage, topo)
    engine.train_step(batches(topo.rank, 1))  # moments exist, weights moved once
    torch.manual_seed(1)
    fresh = build_model("llama", "tiny", VOCAB).eval()
    assert parameter_count(engine.module) == parameter_count(fresh), f"zero={stage}: the logged model size"
    new = {n: p.detach().clone() for n, p in fresh.named_parameters()}
    for name, value in new.items():
        engine.write(name, value)
    batch = batches(0, 1)[0]
    expected = fresh(input_ids=batch, labels=batch).loss.item()
    got = engine.eval_loss(batch)
    assert abs(got - expected) < 1e-5, f"zero={stage}: forward after write uses stale weights ({got} vs {expected})"
    for name, value in new.items():
        assert torch.allclose(engine.read(name), value), f"zero={stage}: read after write differs in {name}"
    engine.train_step(batches(topo.rank, 1))
    for name, value in new.items():  # one small step from the written values, not from the old ones
        assert (engine.read(name) - value).abs().max() < 1e-2, f"zero={stage}: step undid the write of {name}"
    name = "model.layers.1.mlp.down_proj.weight"
    moment = torch.rand_like(new[name])
    engine.write_state(name, "exp_avg", moment)
    assert torch.allclose(engine.read_state(name, "exp_avg"), moment), f"zero={stage}: moment round trip"
    check_read_shard(engine, stage, topo)
    if engine.shard_range(new[name].shape, topo.dp_rank) is None:
        assert stage < 3, "ZeRO-3 shards every parameter"
        return
    for name, value in new.items():  # only this rank's shard, as the packed dispatch sends it under ZeRO-3
        lo, hi = engine.shard_range(value.shape, topo.dp_rank)
        engine.write_shard(name, "", -value.flatten()[lo:hi])
        engine.write_shard(name, "exp_avg", 2 * value.flatten()[lo:hi])
    with torch.no_grad():
        for p in fresh.parameters():
            p.neg_()
    negated = fresh(input_ids=batch, labels=batch).loss.item()
    assert abs(engine.eval_loss(batch) - negated) < 1e-5, "zero=3: forward after write_shard uses stale weights"
    for name, value in new.items():
        assert torch.equal(engine.read(name), -value), f"zero=3: read after write_shard differs in {name}"
        assert torch.equal(engine.read_state(name, "exp_avg"), 2 * value), f"zero=3: moment shard of {name}"


def check_read_shard(engine: DeepSpeedEngine, stage: int, topo: Topology) -> None:
    """Each rank's local range holds exactly those values of the full tensor, and the ranks' ranges tile it."""
    for name in engine.params:
        lo, hi = engine.shard_of(name)
        for key in ("", "exp_avg", "exp_avg_sq"):
            full = engine.read_state(name, key) if key else engine.read(name)
            got = engine.read_shard(name, key)
            assert torch.equal(got, full.flatten()[lo:hi]), f"zero={stage}: read_shard({name!r}, {key!r})"
        spans = [None] * topo.world_size
        torch.distributed.all_gather_object(spans, (lo, hi))
        spans.sort()
        tiles = [a for a, _ in spans] == [0] + [b for _, b in spans[:-1]] and spans[-1][1] == full.numel()
        assert tiles, f"zero={stage}: {name}'s local ranges {spans} do not tile {full.numel()} elements"


def trajectory(stage: int, topo: Topology) -> list[float]:
    engine = engine_for(stage, topo)
    return [engine.train_step([b]) for b in batches(topo.rank, 6)]


def check_mask_hash(topo: Topology) -> None:
    model = build_model("llama", "tiny", VOCAB)
    unit_blocks = tuple(partitioned_blocks(architecture_of(model).unit_blocks(model.config), []))
    verify_same_masks(SubnetSampler(unit_blocks, (0.5,) * 2, seed=5).specs(3), topo)
    with pytest.raises(RuntimeError, match="disagree on the subnet masks"):  # a rank with a corrupted seed
        verify_same_masks(SubnetSampler(unit_blocks, (0.5,) * 2, seed=5 + topo.rank).specs(3), topo)


def check_write_trajectories_and_mask_hash(rank: int, world: int) -> None:
    topo = Topology.from_dist(1)
    for stage in (0, 1, 2, 3):
        check_write(stage, topo)
    reference = trajectory(0, topo)
    for stage in (1, 2, 3):
        losses = trajectory(stage, topo)
        diff = max(abs(a - b) for a, b in zip(losses, reference, strict=True))
        assert diff < 1e-4, f"zero={stage} departs from stage 0 by {diff}: {losses} vs {reference}"
    check_mask_hash(Topology.from_dist(2))
