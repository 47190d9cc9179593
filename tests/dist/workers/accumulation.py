"""Run on 2 ranks by `helpers.dist.run_on_ranks`: one optimizer step over a micro-batch of 8 equals one
over 4 accumulated micro-batches of 2, and activation checkpointing changes nothing, on a TwIST subnet
(κ = 0.5, sliced) under DeepSpeed ZeRO-2, ZeRO-3 and FSDP2."""

from __future__ import annotations

import torch

from twist_scale.config import RunConfig
from twist_scale.engines import build_engine
from twist_scale.models import architecture_of, build_model
from twist_scale.subnet import SubnetSampler, apply_subnet_shapes, partitioned_blocks
from twist_scale.topology import Topology
from helpers import REPO

VOCAB = 64
ENGINES = {"zero2": ("deepspeed", "zero2"), "zero3": ("deepspeed", "zero3"), "fsdp": ("fsdp", "zero1")}


def one_step(engine_name: str, accumulate: int, checkpointing: bool) -> tuple[float, dict[str, torch.Tensor]]:
    """The loss of one SGD step on this rank's 8 rows, and every weight after it."""
    topo = Topology.from_dist(1)
    torch.manual_seed(0)
    model = build_model("llama", "tiny", VOCAB)
    blocks = partitioned_blocks(architecture_of(model).unit_blocks(model.config), shared_layers=[0, 5])
    apply_subnet_shapes(model, blocks, SubnetSampler(tuple(blocks), (0.5,), seed=3).specs(0)[0])
    cfg = RunConfig()
    cfg.parallel.engine, ds_config = ENGINES[engine_name]
    cfg.parallel.ds_config = str(REPO / "ds_configs" / f"{ds_config}.json")
    cfg.parallel.activation_checkpointing = checkpointing
    cfg.optim.name, cfg.optim.beta1, cfg.optim.lr, cfg.optim.warmup_steps, cfg.optim.grad_clip = "sgd", 0, 0.5, 0, 0
    cfg.data.micro_batch_size, cfg.optim.grad_accum_steps = 8 // accumulate, accumulate
    engine = build_engine(model, cfg, topo)
    assert engine.module.is_gradient_checkpointing == checkpointing, engine_name
    values = torch.Generator().manual_seed(7)  # the same subnet values in every variant, as dispatch writes them
    names = sorted(engine.storage.params)
    for name in names:
        shape = engine.storage.read(name).shape
        engine.storage.write(name, torch.randn(shape, generator=values) * 0.1)
    rows = torch.randint(0, VOCAB, (8, 32), generator=torch.Generator().manual_seed(100 + topo.rank))
    loss = engine.train_step(list(rows.split(8 // accumulate)))
    return loss, {name: engine.storage.read(name) for name in names}


def check_accumulation_and_checkpointing(rank: int, world: int) -> None:
    for engine_name in ENGINES:
        loss, weights = one_step(engine_name, 1, False)
        for accumulate, checkpointing in ((4, False), (4, True)):  # checkpointing checked on every micro-batch
            where = f"{engine_name}: accumulate {accumulate}, checkpointing {checkpointing}"
            other_loss, other = one_step(engine_name, accumulate, checkpointing)
            assert abs(other_loss - loss) < 1e-5, f"{where}: loss {other_loss} vs {loss}"
            for name, value in weights.items():
                error = (other[name] - value).abs().max().item()
                assert error < 1e-6, f"{where}: {name} differs by {error:.2e} after one step"
