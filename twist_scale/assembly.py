"""Start-up, in one place: the run's model → its engine → the central model → the synchronisation.

The trainer calls `assemble` once. Dense data parallelism fills the model whole and wraps it in the
engine. TwIST keeps this rank's shards of the full-width model as the central model, shrinks the (still
empty, meta-device) model to the group's first subnet, builds the engine around it, which allocates
only what it keeps (FSDP2 and ZeRO-3: the rank's shards), and hands the synchronisation the engine's
storage; the first dispatch fills the subnet's values.
"""

from __future__ import annotations

import copy
import functools
from dataclasses import dataclass

import torch
from torch import nn

from twist_scale.central import CentralShards
from twist_scale.config import RunConfig
from twist_scale.correction import is_statistic
from twist_scale.distill import Distiller
from twist_scale.engines import build_engine
from twist_scale.engines.base import Engine, moment_keys
from twist_scale.exchange import build_exchange
from twist_scale.run_model import RunModel, build_run_model
from twist_scale.startup import Arrange, fill
from twist_scale.subnet import SubnetSampler, SubnetSpec, apply_subnet_shapes
from twist_scale.sync import DataParallelSync, SubnetSync
from twist_scale.topology import Topology
from twist_scale.unit_order import sort_units_by_weight_norm


@dataclass(frozen=True)
class Assembly:
    model: RunModel  # the full-width architecture and its unit map (the model itself shrunk to the subnet)
    sampler: SubnetSampler  # every group's subnet in every round
    engine: Engine  # trains this rank's group's subnet
    sync: DataParallelSync | SubnetSync  # moves values between the engine and the central model
    full_parameters: int  # of the full-width model (`model.parameters` counts the subnet once shrunk)
    teacher: CentralTeacher | None = None  # --twist.distill central: dispatched with the subnets


def central_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """What the central model holds: every parameter and the unit activation statistics (if any).

    Statistics come first: dispatch needs the means before the output weights whose dropped units
    they stand in for.
    """
    tensors = dict(model.named_parameters()) | {n: b for n, b in model.named_buffers() if is_statistic(n)}
    return {n: tensors[n] for n in sorted(tensors, key=lambda n: not is_statistic(n))}


def central_from_model(
    model: nn.Module, topo: Topology, seed: int, pretrained: str = "", arrange: Arrange | None = None
) -> CentralShards:
    """This rank's shards of the full-width meta-device `model`, filled block by block: no rank holds it whole."""
    central = CentralShards(topo, {n: t.shape for n, t in central_tensors(model).items()})

    def keep(name: str, value: torch.Tensor) -> bool:
        if name in central.shapes:
            central.set_full(name, value.detach())
        return name in central.shapes

    fill(model, seed, pretrained, keep, arrange, central)
    return central


def assemble(cfg: RunConfig, topo: Topology, vocab_size: int) -> Assembly:
    """The run's model, sampler, engine and synchronisation, built once at start-up (see module doc)."""
    run_model = build_run_model(cfg, vocab_size)
    model, blocks = run_model.model, run_model.unit_blocks
    sampler = SubnetSampler(tuple(blocks), cfg.twist.kappas, cfg.seed, cfg.twist.sampling)
    full_parameters = run_model.parameters
    if cfg.is_dense:
        fill(model, cfg.seed, cfg.model.pretrained)
        engine = build_engine(model, cfg, topo)
        add_distiller(engine, cfg, None)
        return Assembly(run_model, sampler, engine, DataParallelSync(engine.storage), full_parameters)
    nested = functools.partial(sort_units_by_weight_norm, unit_blocks=blocks)
    arrange = nested if cfg.twist.sampling == "nested" else None
    central = central_from_model(model, topo, cfg.seed, cfg.model.pretrained, arrange)
    t = cfg.twist
    # full width, weights on the meta device, the buffers start-up computed (rotary frequencies) kept
    teacher_model = copy.deepcopy(model) if t.distill == "central" else None
    apply_subnet_shapes(model, blocks, sampler.specs(0)[topo.group])
    engine = build_engine(model, cfg, topo)  # from the meta device: each engine allocates what it keeps
    aggregate_moments = t.optimizer_state == "aggregate"
    moments = moment_keys(cfg.optim) if aggregate_moments else ()
    storage = engine.storage
    exchange = build_exchange(t.aggregation, central, t.wire_dtype, storage.shard_range)
    sync = SubnetSync(
        central, storage, blocks, topo, moments, run_model.correction, not aggregate_moments, exchange, t.bucket_mb
    )
    teacher = CentralTeacher(cfg, topo, central, run_model, teacher_model) if teacher_model is not None else None
    add_distiller(engine, cfg, teacher)
    return Assembly(run_model, sampler, engine, sync, full_parameters, teacher)


class CentralTeacher:
    """The full-width central model as of the round's dispatch, as every group's teacher.

    An engine of the run's kind around the full-width model that never steps: under ZeRO-3 / FSDP2 it
    is sharded like the student, so no rank holds it whole, and it is filled by the same exchange as the
    subnets, with every unit kept. It costs each rank its share of the full model (no Adam moments: they
    appear at a first step, which never comes; DeepSpeed still keeps its fp32 master partition) and, per
    round, a dispatch of the full width.
    """

    def __init__(
        self, cfg: RunConfig, topo: Topology, central: CentralShards, run_model: RunModel, model: nn.Module
    ) -> None:
        """`model`: the full-width run model after start-up (weights on the meta device, computed buffers kept)."""
        self.engine = build_engine(model, cfg, topo)
        blocks, storage = run_model.unit_blocks, self.engine.storage
        exchange = build_exchange(cfg.twist.aggregation, central, "fp32", storage.shard_range)
        self.sync = SubnetSync(
            central, storage, blocks, topo, (), run_model.correction, False, exchange, cfg.twist.bucket_mb
        )
        self.full_width = [SubnetSpec({})] * topo.groups  # no block listed: every unit kept, nothing drawn

    def dispatch(self) -> None:
        self.sync.dispatch(self.full_width)


def add_distiller(engine: Engine, cfg: RunConfig, teacher: CentralTeacher | None) -> None:
    """--twist.distill: the teacher's term joins `engine`'s training loss (`distill.Distiller`)."""
    t = cfg.twist
    if t.distill != "none":
        online = teacher.engine.logits if teacher is not None else None
        engine.distiller = Distiller(t.distill_weight, t.distill_temperature, online)
