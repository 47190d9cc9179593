"""The TwIST round loop: dispatch subnets, train H local steps, aggregate, resample."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import logging
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from twist_scale import config as config_mod
from twist_scale.aggregate import CentralModel
from twist_scale.central_io import TWIST_META, save_central
from twist_scale.checkpoint import Checkpointer, rng_state, set_rng_state
from twist_scale.config import RunConfig
from twist_scale.correction import ACT_MEAN, install_correction, keep_statistics_fp32, with_stat_axes
from twist_scale.data import ShardedBatches, eval_batches, load_tokenizer, packed_blocks, prepare_tokenizer, sample_line
from twist_scale.distributed import init_distributed, setup_logging
from twist_scale.engines import build_engine
from twist_scale.engines.base import moment_keys
from twist_scale.models import architecture_of, build_model
from twist_scale.subnet import (
    SubnetSampler,
    SubnetSpec,
    apply_subnet_shapes,
    default_shared_layers,
    partitioned_groups,
)
from twist_scale.sync import RoundSync, central_tensors
from twist_scale.topology import Topology
from twist_scale.tracking import build_tracker

log = logging.getLogger(__name__)


def verify_same_masks(specs: list[SubnetSpec], topo: Topology) -> None:
    """Masks are never sent, so prove every rank computed the same ones (a cheap hash all-reduce)."""
    digest = b"".join(s.fingerprint() for s in specs)
    value = int.from_bytes(hashlib.sha256(digest).digest()[:7], "little")
    lo, hi = (torch.tensor([value], device=topo.device) for _ in range(2))
    dist.all_reduce(lo, op=dist.ReduceOp.MIN)
    dist.all_reduce(hi, op=dist.ReduceOp.MAX)
    if lo.item() != hi.item():
        raise RuntimeError(
            f"rank {topo.rank}: ranks disagree on the subnet masks (hash {value:x}); every rank must run the "
            "same config and --seed"
        )


class Trainer:
    def __init__(self, cfg: RunConfig) -> None:
        self.cfg = cfg
        init_distributed(cfg.parallel.backend, cfg.parallel.timeout_s)
        config_mod.validate(cfg, dist.get_world_size())
        self.topo = topo = Topology.from_dist(cfg.twist.groups)
        setup_logging(topo.rank)
        self.is_main = topo.rank == 0
        self.out_dir = Path(cfg.out_dir)
        if self.is_main:
            config_mod.save_resolved(cfg, self.out_dir / "config.json")

        tok_dir = prepare_tokenizer(cfg.data, self.out_dir / "tokenizer", train=self.is_main)
        dist.barrier()
        self.tokenizer = load_tokenizer(tok_dir, sample_line(cfg.data.train_files) if cfg.data.train_files else "a b")
        cache = Path(cfg.data.cache_dir) if cfg.data.cache_dir else self.out_dir / "cache"

        def blocks(files: list[str], split: str) -> np.ndarray:  # rank 0 tokenizes, the others read its cache
            load = functools.partial(
                packed_blocks,
                files,
                self.tokenizer,
                tok_dir,
                cfg.data.block_size,
                cache,
                cfg.data.hub_dataset,
                cfg.data.text_field,
                split,
            )
            if self.is_main:
                load()
            dist.barrier()
            return load()

        self.batches = ShardedBatches(
            blocks(cfg.data.train_files, "train"), *topo.data_shard, cfg.data.micro_batch_size, cfg.seed
        )
        self.valid = (
            eval_batches(
                blocks(cfg.data.valid_files, "validation"),
                topo.dp_rank,
                topo.ranks_per_group,
                cfg.data.micro_batch_size,
                cfg.eval.max_batches,
            )
            if cfg.data.valid_files
            else []
        )

        torch.manual_seed(cfg.seed)  # the same full-width initialisation on every rank
        model = build_model(cfg.model.arch, cfg.model.size, len(self.tokenizer), cfg.model.pretrained)
        arch = architecture_of(model)
        layers = arch.num_layers(model.config)
        shared = default_shared_layers(layers) if cfg.twist.shared_layers is None else cfg.twist.shared_layers
        if any(not 0 <= i < layers for i in shared):
            raise config_mod.ConfigError(f"--twist.shared_layers {shared}: the model has layers 0..{layers - 1}")
        self.shared_layers = sorted(shared)
        self.unit_groups = with_stat_axes(
            partitioned_groups(arch.unit_groups(model.config), shared), cfg.twist.correction
        )
        install_correction(model, self.unit_groups, cfg.twist.correction, cfg.twist.stat_momentum)
        self.sampler = SubnetSampler(tuple(self.unit_groups), topo.groups, cfg.twist.kappa, cfg.seed)

        self.central: CentralModel | None = None
        if not cfg.is_dense:
            tensors = central_tensors(model)
            self.central = CentralModel(topo, {n: t.shape for n, t in tensors.items()})
            for name, t in tensors.items():
                self.central.set_full(name, t.data)
            apply_subnet_shapes(model, self.unit_groups, self.sampler.specs(0)[topo.group])
        self.engine = build_engine(model, cfg, topo)
        keep_statistics_fp32(self.engine.module)
        self.sync = (
            None
            if self.central is None
            else RoundSync(
                self.central,
                self.engine,
                self.unit_groups,
                topo,
                moment_keys(cfg.optim) if cfg.twist.optimizer_state == "aggregate" else (),
                cfg.twist.correction,
                reset_moments=cfg.twist.optimizer_state == "reset",
            )
        )
        self.round = 0
        self.skipped_steps = 0
        self.checkpointer = Checkpointer(self.out_dir / "checkpoints", topo.rank, cfg.checkpoint.keep_last, topo.device)
        self.tracker = build_tracker(cfg.tracking, self.out_dir, self.is_main)
        self.tracker.log_params(config_mod.flat_params(cfg))
        self.tracker.log_artifact(self.out_dir / "config.json")
        self.tracker.log_artifact(tok_dir, "tokenizer")
        n_params = sum(p.numel() for p in model.parameters())
        log.info(
            "world %d = %d groups x %d ranks; subnet %.2fM params; %s",
            topo.world_size,
            topo.groups,
            topo.ranks_per_group,
            n_params / 1e6,
            "dense" if cfg.is_dense else f"kappa={cfg.twist.kappa}",
        )

    # ------------------------------------------------------------------ the loop
    def train(self) -> None:
        try:
            self._train()
        except BaseException:
            self.tracker.close("FAILED")
            raise
        self.tracker.close()

    def _train(self) -> None:
        with self.phase("resume"):
            self.resume()
        H = self.cfg.twist.local_steps
        bar = tqdm(total=self.cfg.total_steps, initial=self.round * H, disable=not self.is_main, desc="train")
        while self.round < self.cfg.twist.rounds:
            specs = self.sampler.specs(self.round)
            with self.phase("dispatch"):
                dispatch_s = self.timed(self.dispatch, specs[self.topo.group])
            if self.round and self.cfg.eval.every_rounds and self.round % self.cfg.eval.every_rounds == 0:
                with self.phase("evaluation"):
                    self.evaluate()
            start = time.perf_counter()
            with self.phase("local step"):
                losses = [self.train_step(bar) for _ in range(H)]
            compute_s = time.perf_counter() - start
            with self.phase("aggregation"):
                agg_s = self.timed(self.aggregate, specs)
            self.round += 1
            with self.phase("logging"):
                self.log_round(losses, compute_s, agg_s + dispatch_s)
            every = self.cfg.checkpoint.every_rounds
            if self.round == self.cfg.twist.rounds or (every and self.round % every == 0):
                with self.phase("checkpoint"):
                    self.save()
        bar.close()
        with self.phase("final evaluation and export"):
            self.dispatch(self.sampler.specs(self.round)[self.topo.group])
            self.evaluate()
            final = self.export_central(self.out_dir / "final")
            self.tracker.log_artifact(final / TWIST_META, "final")

    @contextlib.contextmanager
    def phase(self, name: str):  # noqa: ANN201
        """Name the rank, phase and round in any failure, e.g. a peer that crashed or a timeout."""
        try:
            yield
        except Exception as err:
            raise RuntimeError(
                f"rank {self.topo.rank} (group {self.topo.group}) failed in phase '{name}' at round {self.round}: "
                f"{type(err).__name__}: {err}"
            ) from err

    def export_central(self, directory: Path) -> Path:
        """Save the full-width central model as a Hugging Face checkpoint, plus what pruning needs.

        The only moment a rank holds the whole model: rank 0 assembles it tensor by tensor.
        """
        weights, stats = {}, {}
        for name, full in self.full_state():
            if self.is_main:
                (stats if name.endswith(ACT_MEAN) else weights)[name] = full.clone()
        if self.is_main:
            model = build_model(
                self.cfg.model.arch, self.cfg.model.size, len(self.tokenizer), self.cfg.model.pretrained
            )
            missing, unexpected = model.load_state_dict(weights, strict=False)
            tied = {k for k in model.state_dict() if k not in dict(model.named_parameters())}  # e.g. GPT-2 lm_head
            if unexpected or set(missing) - tied:
                raise RuntimeError(f"central model does not fit its architecture: {missing=} {unexpected=}")
            model.tie_weights()
            save_central(
                directory,
                model,
                self.tokenizer,
                stats,
                {
                    "kappa": self.cfg.twist.kappa,
                    "groups": self.topo.groups,
                    "rounds": self.round,
                    "correction": self.cfg.twist.correction,
                    "shared_layers": self.shared_layers,
                    "seed": self.cfg.seed,
                    "tokens": self.round
                    * self.cfg.twist.local_steps
                    * self.cfg.data.micro_batch_size
                    * self.cfg.data.block_size
                    * self.topo.world_size,
                },
            )
            log.info("central model saved to %s", directory)
        dist.barrier()
        return directory

    def train_step(self, bar: tqdm) -> float:
        loss = self.engine.train_step(next(self.batches))
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

    @staticmethod
    def timed(fn, *args) -> float:  # noqa: ANN001
        start = time.perf_counter()
        fn(*args)
        return time.perf_counter() - start

    # ------------------------------------------------------------------ TwIST
    def dispatch(self, spec: SubnetSpec) -> None:
        if self.sync is not None:  # dense: the engine already holds the whole model
            self.sync.dispatch(spec)

    def aggregate(self, specs: list[SubnetSpec]) -> None:
        if self.sync is not None:
            self.sync.aggregate(specs)

    def full_state(self):  # noqa: ANN201 - yields (name, full tensor); collective on every rank
        """The full-width model, one tensor at a time (central model, or the dense engine's weights)."""
        if self.central is None:
            for name in self.engine.params:
                yield name, self.engine.read(name)
        else:
            for name in self.central.shapes:
                yield name, self.central.gather(name)

    # ------------------------------------------------------------------ evaluation and logging
    def evaluate(self) -> dict[str, float]:
        """Validation perplexity of the central model seen through this round's G subnets.

        Ranks may hold unequal batch counts (even none): they sum losses and counts, so every rank
        joins the same collectives and gets the same value.
        """
        if not self.cfg.data.valid_files:  # the same answer on every rank, unlike len(self.valid)
            return {}
        topo = self.topo
        local = [sum(self.engine.eval_loss(b) for b in self.valid), len(self.valid)]
        totals = torch.tensor(local, dtype=torch.float64, device=topo.device)
        dist.all_reduce(totals, group=topo.intra_group)
        per_rank = [torch.zeros(2, dtype=torch.float64, device=topo.device) for _ in range(topo.world_size)]
        dist.all_gather(per_rank, totals)
        per_group = [per_rank[g * topo.ranks_per_group].tolist() for g in range(topo.groups)]
        if any(count == 0 for _, count in per_group):
            log.warning(
                "evaluation skipped: a group has no full validation batch; add validation text or lower "
                "--data.micro_batch_size"
            )
            return {}
        group_losses = [total / count for total, count in per_group]
        mean_loss = sum(group_losses) / len(group_losses)
        metrics = {f"eval/ppl_kappa_{self.cfg.twist.kappa:.2f}": math.exp(mean_loss), "eval/loss": mean_loss}
        if self.topo.groups > 1:
            metrics |= {f"eval/ppl_group{g}": math.exp(v) for g, v in enumerate(group_losses)}
        step = self.round * self.cfg.twist.local_steps
        self.tracker.log_metrics(metrics, step)
        log.info("round %d eval: ppl %.2f (kappa %.2f)", self.round, math.exp(mean_loss), self.cfg.twist.kappa)
        return metrics

    def log_round(self, losses: list[float], compute_s: float, comm_s: float) -> None:
        topo, H = self.topo, self.cfg.twist.local_steps
        mine = torch.tensor(losses, device=topo.device)
        everyone = [torch.zeros(H, device=topo.device) for _ in range(topo.world_size)]
        dist.all_gather(everyone, mine)
        table = torch.stack(everyone).cpu()  # (world, H)
        first = (self.round - 1) * H
        tokens = H * self.cfg.data.micro_batch_size * self.cfg.data.block_size * topo.world_size
        for i in range(H):
            self.tracker.log_metrics({"train/loss": table[:, i].nanmean().item()}, first + i + 1)
        by_group = table.view(topo.groups, topo.ranks_per_group * H).nanmean(dim=1)
        metrics = {
            "twist/round": self.round,
            "twist/compute_seconds": compute_s,
            "twist/agg_seconds": comm_s,
            "twist/agg_share": comm_s / (compute_s + comm_s),
            "twist/agg_bytes": self.central.bytes_sent if self.central else 0,
            "perf/tokens_per_s": tokens / (compute_s + comm_s),
            "train/lr": self.engine.lr(),
            "train/skipped_steps": self.skipped_steps,
        }
        metrics |= {f"train/loss_group{g}": v.item() for g, v in enumerate(by_group)}
        if self.central:
            self.central.bytes_sent = 0
        self.tracker.log_metrics(metrics, self.round * H)
        log.info(
            "round %d/%d loss %.4f | %.0f tok/s | compute %.2fs agg %.2fs",
            self.round,
            self.cfg.twist.rounds,
            table[:, -1].nanmean().item(),
            metrics["perf/tokens_per_s"],
            compute_s,
            comm_s,
        )

    # ------------------------------------------------------------------ checkpoints
    def weights_finite(self) -> bool:
        """True on every rank when no rank holds a non-finite weight (a local check, one all-reduce)."""
        if self.central is not None:
            tensors = self.central.shards.values()
        else:
            tensors = [getattr(p, "ds_tensor", p.data) for p in self.engine.module.parameters()]
        flag = torch.tensor([float(all(bool(torch.isfinite(t).all()) for t in tensors))], device=self.topo.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        return flag.item() == 1.0

    def save(self) -> None:
        topo = self.topo
        if not self.weights_finite():
            raise FloatingPointError(
                "the weights hold NaN or inf; refusing to overwrite good checkpoints with them (the newest "
                "valid one is intact). Lower --optim.lr or set --optim.grad_clip, then resume."
            )

        def write(directory: Path) -> None:
            state = {
                "round": self.round,
                "data": self.batches.state_dict(),
                "rng": rng_state(),
                "central": self.central.shards if self.central else {},
            }
            torch.save(state, directory / f"rank_{topo.rank:05d}.pt")
            group_dir = directory / f"group_{topo.group:04d}"
            group_dir.mkdir(exist_ok=True)
            self.engine.save(str(group_dir))

        meta = {"world_size": topo.world_size, "groups": topo.groups, "config": dataclasses.asdict(self.cfg)}
        path = self.checkpointer.save(self.round, write, meta)
        log.info("checkpoint %s", path)

    def resume(self) -> None:
        if self.cfg.checkpoint.resume:
            path = self.checkpointer.latest_valid()
            if path is not None:
                state = torch.load(path / f"rank_{self.topo.rank:05d}.pt", weights_only=False)
                self.round = state["round"]
                self.batches.load_state_dict(state["data"])
                set_rng_state(state["rng"])
                if self.central is not None:
                    self.central.shards = state["central"]
                self.engine.load(str(path / f"group_{self.topo.group:04d}"))
                log.info("resumed from %s at round %d", path, self.round)
        verify_same_masks(self.sampler.specs(self.round), self.topo)
