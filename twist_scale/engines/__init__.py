"""Training engines behind one narrow interface; the trainer never imports deepspeed or FSDP."""

from __future__ import annotations

from torch import nn

from twist_scale.config import RunConfig
from twist_scale.engines.base import Engine
from twist_scale.topology import Topology


def build_engine(model: nn.Module, cfg: RunConfig, topo: Topology) -> Engine:
    if cfg.parallel.engine == "deepspeed":
        from twist_scale.engines.deepspeed_engine import DeepSpeedEngine

        return DeepSpeedEngine(model, cfg, topo)
    if cfg.parallel.engine == "fsdp":
        from twist_scale.engines.fsdp_engine import FSDPEngine

        return FSDPEngine(model, cfg, topo)
    from twist_scale.engines.local import LocalEngine

    return LocalEngine(model, cfg)


__all__ = ["Engine", "build_engine"]
