"""The TwIST round loop: dispatch subnets, train H local steps, aggregate, resample.

Everything else is a component built here: data (`data.load_run_data`); the model, its subnet
sampler, the engine and the synchronisation, assembled once (`assembly.assemble`); metric collectives
(`metrics.RunMetrics`), checkpoints of the stateful components (`checkpoint.Checkpointer`) and the
central model's export (`central_io.export_central`).
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from twist_scale import config as config_mod
from twist_scale.assembly import assemble
from twist_scale.central_io import TWIST_META, export_central, training_record
from twist_scale.checkpoint import Checkpointer, RngState
from twist_scale.config import RunConfig
from twist_scale.config_validate import validate
from twist_scale.data import load_run_data
from twist_scale.distributed import init_distributed
from twist_scale.engines.base import Engine
from twist_scale.interrupts import stop_reason
from twist_scale.logs import setup_logging
from twist_scale.metrics import RunMetrics
from twist_scale.phases import Phases
from twist_scale.run_model import full_model_builder
from twist_scale.subnet import SubnetSpec
from twist_scale.summary import run_summary
from twist_scale.sync import verify_same_masks
from twist_scale.topology import Topology
from twist_scale.tracking import start_run_tracking

log = logging.getLogger(__name__)


class Trainer:
    def __init__(self, cfg: RunConfig) -> None:
        self.cfg = cfg
        init_distributed(cfg.parallel.backend, cfg.parallel.timeout_s)
        validate(cfg, dist.get_world_size())
        self.topo = topo = Topology.from_dist(cfg.twist.groups, cfg.parallel.timeout_s)
        setup_logging(topo.rank)
        self.out_dir = Path(cfg.out_dir)
        if topo.rank == 0:
            config_mod.save_resolved(cfg, self.out_dir / "config.json")
        self.data = load_run_data(cfg, topo)
        torch.manual_seed(cfg.seed)  # the same stream on every rank (weights are seeded per block: startup.fill)
        parts = assemble(cfg, topo, len(self.data.tokenizer))
        self.model, self.sampler, self.engine, self.sync = parts.model, parts.sampler, parts.engine, parts.sync
        self.teacher = parts.teacher
        self.full_parameters = parts.full_parameters
        self.round = self.skipped_steps = 0
        self.checkpointer = Checkpointer.for_run(self.out_dir / "checkpoints", topo, cfg.checkpoint, cfg.twist.rounds)
        self.stateful = {"data": self.data.train, "rng": RngState(), "central": self.sync}
        self.tracker = start_run_tracking(cfg, self.out_dir, topo.rank == 0, self.data.tokenizer_dir)
        self.metrics = RunMetrics(cfg, topo, self.tracker)
        self.metrics.log_startup_memory()
        self.phases = Phases(topo.rank, topo.group, lambda: self.round)
        log.info(
            "world %d = %d groups x %d ranks; model %.2fM params; %s",
            topo.world_size,
            topo.groups,
            topo.ranks_per_group,
            self.full_parameters / 1e6,
            "dense"
            if cfg.is_dense
            else f"this group's subnet {self.model.parameters / 1e6:.2f}M params, "
            f"kappa={','.join(map(str, cfg.twist.kappas))}",
        )

    def train(self) -> None:
        try:
            self._train()
        except BaseException as err:
            self.tracker.close("FAILED" if stop_reason(err) is None else "KILLED")
            raise
        self.tracker.close()

    def _train(self) -> None:
        with logging_redirect_tqdm():  # log lines above the progress bar, never on its line
            self._loop()

    def _loop(self) -> None:
        cfg, phase, seconds = self.cfg, self.phases, self.phases.seconds
        with phase("resume"):
            self.resume()
        bar = tqdm(total=cfg.total_steps, initial=self.round * cfg.twist.local_steps, disable=self.topo.rank != 0)
        while self.round < cfg.twist.rounds:
            specs = self.specs()
            with phase("dispatch"):
                self.sync.dispatch(specs)
                if self.teacher is not None:
                    self.teacher.dispatch()
            if self.round and cfg.eval.every_rounds and self.round % cfg.eval.every_rounds == 0:
                with phase("evaluation"):
                    self.metrics.evaluate(self.engine, self.data.valid, self.round)
            with phase("local step"):
                losses = self.local_steps(bar)
            with phase("aggregation"):
                self.sync.aggregate(specs)
            self.round += 1
            with phase("logging"):
                self.metrics.log_round(
                    self.round,
                    losses,
                    seconds["local step"],
                    seconds["dispatch"],
                    seconds["aggregation"],
                    self.sync.take_traffic(),
                    self.engine.lr(),
                    self.skipped_steps,
                    self.engine.distiller.take_parts() if self.engine.distiller is not None else None,
                )
            if self.checkpointer.due(self.round):
                with phase("checkpoint"):
                    self.save()
        bar.close()
        with phase("final evaluation and export"):
            self.sync.dispatch(self.specs())
            metrics = self.metrics.evaluate(self.engine, self.data.valid, self.round)
            final, build = self.out_dir / "final", full_model_builder(cfg, len(self.data.tokenizer))
            export_central(
                final,
                self.sync.full_state(),
                build,
                self.data.tokenizer,
                training_record(cfg, self.topo, self.round, self.model.shared_layers),
                self.topo.rank == 0,
            )
            dist.barrier()
            self.tracker.log_artifact(final / TWIST_META, "final")
        log.info("%s", run_summary(cfg, final, metrics, self.full_parameters))

    def specs(self) -> list[SubnetSpec]:
        """This round's subnets; a rewired run first ranks the units of the central model (collective)."""
        importance = self.sync.unit_importance() if self.cfg.twist.sampling == "rewired" else None
        return self.sampler.specs(self.round, importance)

    def local_steps(self, bar: tqdm) -> list[float]:
        """H steps. Under `--on_nonfinite stop` a group stops at its first non-finite loss (never stepped
        on), and at the round's end every group learns which groups did and stops with the same error."""
        losses = []
        for _ in range(self.cfg.twist.local_steps):
            losses.append(self.train_step(bar))
            if self.cfg.on_nonfinite == "stop" and not math.isfinite(losses[-1]):
                break
        if self.cfg.on_nonfinite == "stop":
            diverged = self.metrics.groups_that_diverged(not math.isfinite(losses[-1]))
            if diverged:
                raise FloatingPointError(
                    f"non-finite loss in group(s) {', '.join(map(str, diverged))}; the step was not applied and the "
                    "last checkpoint is intact. Lower --optim.lr, raise --optim.warmup_steps, or pass "
                    "--on_nonfinite skip"
                )
        return losses

    def train_step(self, bar: tqdm) -> float:
        loss = self.engine.train_step([next(self.data.train) for _ in range(self.cfg.optim.grad_accum_steps)])
        if not math.isfinite(loss) and self.cfg.on_nonfinite == "skip":
            self.skipped_steps += 1
            log.warning("rank %d: non-finite loss, step skipped (%d so far)", self.topo.rank, self.skipped_steps)
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.3f}", lr=f"{self.engine.lr():.2e}")
        return loss

    @property
    def engine_files(self) -> Engine | None:
        """The engine, where its own files are part of a checkpoint (`engine_in_checkpoint` in sync.py)."""
        return self.engine if self.sync.engine_in_checkpoint else None

    def save(self) -> None:
        topo, finite = self.topo, self.metrics.all_finite(self.sync.local_tensors())
        meta = {"world_size": topo.world_size, "groups": topo.groups, "config": config_mod.to_dict(self.cfg)}
        path = self.checkpointer.save_run(self.round, self.stateful, self.engine_files, meta, finite)
        log.info("checkpoint %s", path)

    def resume(self) -> None:
        path = self.checkpointer.latest_valid() if self.cfg.checkpoint.resume else None
        if path is not None:
            self.round, elsewhere = self.checkpointer.load_run(path, self.stateful, self.engine_files)
            if elsewhere or self.engine_files is None:  # the engine starts fresh at the saved step; dispatch fills it
                self.engine.resume_at(self.round * self.cfg.twist.local_steps, self.sync.moments)
            log.info("resumed from %s at round %d%s", path, self.round, " (resharded)" if elsewhere else "")
        verify_same_masks(self.specs(), self.topo)
