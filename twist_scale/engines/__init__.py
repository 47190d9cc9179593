"""Training engines behind two narrow interfaces, the trainer's `Engine` and the synchronisation's
`EngineStorage`; the trainer never imports deepspeed or FSDP."""

from __future__ import annotations

from torch import nn

from twist_scale.config import RunConfig
from twist_scale.correction import keep_statistics_fp32
from twist_scale.engines.base import Engine
from twist_scale.engines.layers import prepare_layers
from twist_scale.topology import Topology


def build_engine(model: nn.Module, cfg: RunConfig, topo: Topology) -> Engine:
    """The run's engine around `model` (its layers checkpointed and compiled as configured); correction
    statistics stay fp32 whatever precision it trains in."""
    prepare_layers(model, cfg.parallel)
    if cfg.parallel.engine == "deepspeed":
        from twist_scale.engines.deepspeed_engine import DeepSpeedEngine

        engine: Engine = DeepSpeedEngine(model, cfg, topo)
    elif cfg.parallel.engine == "fsdp":
        from twist_scale.engines.fsdp_engine import FSDPEngine

        engine = FSDPEngine(model, cfg, topo)
    else:
        from twist_scale.engines.single_process import SingleProcessEngine

        engine = SingleProcessEngine(model, cfg)
    keep_statistics_fp32(engine.module)
    return engine


__all__ = ["Engine", "build_engine"]
