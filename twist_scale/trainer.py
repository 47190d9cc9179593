"""The TwIST round loop: dispatch subnets, train H local steps, aggregate, resample.

Everything else is a component built here: data (`data.load_run_data`), the engine (`engines/`),
the synchronisation (`sync.RoundSync`, or `sync.DenseSync` for plain data parallelism), metric
collectives (`metrics.RunMetrics`), checkpoints (`checkpoint.Checkpointer`) and the central model's
export (`central_io.export_central`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import time
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from twist_scale import config as config_mod
from twist_scale.central_io import TWIST_META, export_central
from twist_scale.checkpoint import Checkpointer, rng_state, set_rng_state
from twist_scale.config import RunConfig
from twist_scale.config_load import validate
from twist_scale.correction import correction_of
from twist_scale.data import load_run_data
from twist_scale.distributed import init_distributed
from twist_scale.logs import setup_logging
from twist_scale.metrics import RunMetrics
from twist_scale.models import architecture_of, build_model
from twist_scale.subnet import SubnetSampler, default_shared_layers, partitioned_groups
from twist_scale.sync import build_engine_and_sync, verify_same_masks
from twist_scale.topology import Topology
from twist_scale.tracking import build_tracker

log = logging.getLogger(__name__)


class Trainer:
    def __init__(self, cfg: RunConfig) -> None:
        self.cfg = cfg
        init_distributed(cfg.parallel.backend, cfg.parallel.timeout_s)
        validate(cfg, dist.get_world_size())
        self.topo = topo = Topology.from_dist(cfg.twist.groups)
        setup_logging(topo.rank)
        self.is_main, self.out_dir = topo.rank == 0, Path(cfg.out_dir)
        if self.is_main:
            config_mod.save_resolved(cfg, self.out_dir / "config.json")
        self.data = load_run_data(cfg, topo, dist.barrier)

        torch.manual_seed(cfg.seed)  # the same full-width initialisation on every rank
        model = self.build_full_model()
        layers = architecture_of(model).num_layers(model.config)
        shared = default_shared_layers(layers) if cfg.twist.shared_layers is None else cfg.twist.shared_layers
        if any(not 0 <= i < layers for i in shared):
            raise config_mod.ConfigError(f"--twist.shared_layers {shared}: the model has layers 0..{layers - 1}")
        self.shared_layers = sorted(shared)
        unit_groups = partitioned_groups(architecture_of(model).unit_groups(model.config), shared)
        correction = correction_of(cfg.twist.correction)
        unit_groups = correction.unit_groups(unit_groups)
        correction.install(model, unit_groups, cfg.twist.stat_momentum)
        self.sampler = SubnetSampler(tuple(unit_groups), topo.groups, cfg.twist.kappa, cfg.seed)
        self.engine, self.sync = build_engine_and_sync(model, cfg, topo, unit_groups, self.sampler.specs(0))
        self.round = self.skipped_steps = 0
        self.checkpointer = Checkpointer(
            self.out_dir / "checkpoints",
            topo.rank,
            cfg.checkpoint.keep_last,
            topo.device,
            cfg.checkpoint.every_rounds,
            cfg.twist.rounds,
        )
        self.tracker = build_tracker(cfg.tracking, self.out_dir, self.is_main)
        self.tracker.log_params(config_mod.flat_params(cfg))
        self.tracker.log_artifact(self.out_dir / "config.json")
        self.tracker.log_artifact(self.data.tokenizer_dir, "tokenizer")
        self.metrics = RunMetrics(cfg, topo, self.tracker)
        n_params = sum(p.numel() for p in model.parameters())
        mode = "dense" if cfg.is_dense else f"kappa={cfg.twist.kappa}"
        log.info(
            "world %d = %d groups x %d ranks; subnet %.2fM params; %s",
            topo.world_size,
            topo.groups,
            topo.ranks_per_group,
            n_params / 1e6,
            mode,
        )

    def build_full_model(self) -> torch.nn.Module:
        m = self.cfg.model
        return build_model(m.arch, m.size, len(self.data.tokenizer), m.pretrained)

    def train(self) -> None:
        try:
            self._train()
        except BaseException:
            self.tracker.close("FAILED")
            raise
        self.tracker.close()

    def _train(self) -> None:
        cfg, H = self.cfg, self.cfg.twist.local_steps
        with self.phase("resume"):
            self.resume()
        bar = tqdm(total=cfg.total_steps, initial=self.round * H, disable=not self.is_main, desc="train")
        while self.round < cfg.twist.rounds:
            specs = self.sampler.specs(self.round)
            with self.phase("dispatch"), self.timer() as dispatch_s:
                self.sync.dispatch(specs[self.topo.group])
            if self.round and cfg.eval.every_rounds and self.round % cfg.eval.every_rounds == 0:
                with self.phase("evaluation"):
                    self.metrics.evaluate(self.engine, self.data.valid, self.round)
            with self.phase("local step"), self.timer() as compute_s:
                losses = [self.train_step(bar) for _ in range(H)]
            with self.phase("aggregation"), self.timer() as aggregate_s:
                self.sync.aggregate(specs)
            self.round += 1
            with self.phase("logging"):
                comm_s = dispatch_s[0] + aggregate_s[0]
                self.metrics.log_round(
                    self.round,
                    losses,
                    compute_s[0],
                    comm_s,
                    self.sync.take_bytes(),
                    self.engine.lr(),
                    self.skipped_steps,
                )
            if self.checkpointer.due(self.round):
                with self.phase("checkpoint"):
                    self.save()
        bar.close()
        with self.phase("final evaluation and export"):
            self.sync.dispatch(self.sampler.specs(self.round)[self.topo.group])
            self.metrics.evaluate(self.engine, self.data.valid, self.round)
            final = self.out_dir / "final"
            export_central(
                final, self.sync.full_state(), self.build_full_model, self.data.tokenizer, self.meta(), self.is_main
            )
            dist.barrier()
            log.info("central model saved to %s", final)
            self.tracker.log_artifact(final / TWIST_META, "final")

    def train_step(self, bar: tqdm) -> float:
        loss = self.engine.train_step(next(self.data.train))
        if not math.isfinite(loss):
            if self.cfg.on_nonfinite == "stop":
                raise FloatingPointError(
                    f"non-finite loss in group {self.topo.group}; the step was not applied and the last "
                    "checkpoint is intact. Lower --optim.lr, raise --optim.warmup_steps, or pass --on_nonfinite skip"
                )
            self.skipped_steps += 1
            log.warning("rank %d: non-finite loss, step skipped (%d so far)", self.topo.rank, self.skipped_steps)
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.3f}", lr=f"{self.engine.lr():.2e}")
        return loss

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Name the rank, phase and round in any failure, e.g. a peer that crashed or a timeout."""
        try:
            yield
        except Exception as err:
            raise RuntimeError(
                f"rank {self.topo.rank} (group {self.topo.group}) failed in phase '{name}' at round {self.round}: "
                f"{type(err).__name__}: {err}"
            ) from err

    @staticmethod
    @contextlib.contextmanager
    def timer() -> Iterator[list[float]]:
        """Seconds spent in the block, in the yielded list's one entry once the block ends."""
        elapsed, start = [0.0], time.perf_counter()
        yield elapsed
        elapsed[0] = time.perf_counter() - start

    def meta(self) -> dict:
        """How the central model was trained, for twist.json beside the exported weights."""
        cfg = self.cfg
        tokens_per_step = cfg.data.micro_batch_size * cfg.data.block_size * self.topo.world_size
        return {
            "kappa": cfg.twist.kappa,
            "groups": self.topo.groups,
            "rounds": self.round,
            "correction": cfg.twist.correction,
            "shared_layers": self.shared_layers,
            "seed": cfg.seed,
            "tokens": self.round * cfg.twist.local_steps * tokens_per_step,
        }

    def save(self) -> None:
        topo, finite = self.topo, self.metrics.all_finite(self.sync.local_tensors())

        def write(directory: Path) -> None:
            state = {"round": self.round, "data": self.data.train.state_dict(), "rng": rng_state()}
            torch.save(state | {"central": self.sync.state_dict()}, directory / f"rank_{topo.rank:05d}.pt")
            group_dir = directory / f"group_{topo.group:04d}"
            group_dir.mkdir(exist_ok=True)
            self.engine.save(str(group_dir))

        meta = {"world_size": topo.world_size, "groups": topo.groups, "config": dataclasses.asdict(self.cfg)}
        log.info("checkpoint %s", self.checkpointer.save(self.round, write, meta, finite))

    def resume(self) -> None:
        path = self.checkpointer.latest_valid() if self.cfg.checkpoint.resume else None
        if path is not None:
            state = torch.load(path / f"rank_{self.topo.rank:05d}.pt", weights_only=False)
            self.round = state["round"]
            self.data.train.load_state_dict(state["data"])
            set_rng_state(state["rng"])
            self.sync.load_state_dict(state["central"])
            self.engine.load(str(path / f"group_{self.topo.group:04d}"))
            log.info("resumed from %s at round %d", path, self.round)
        verify_same_masks(self.sampler.specs(self.round), self.topo)
