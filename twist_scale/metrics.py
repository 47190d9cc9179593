"""Every metric collective of a run: validation perplexity, per-round losses and speed, finiteness.

Each call is collective over the world (every rank must call it, in the same order) and moves its
tensors on the topology's communication device; only rank 0's tracker writes.
"""

from __future__ import annotations

import logging
import math
import resource
from collections.abc import Iterable

import torch
import torch.distributed as dist

from twist_scale.central import Traffic
from twist_scale.config import RunConfig
from twist_scale.engines.base import Engine
from twist_scale.topology import Topology
from twist_scale.tracking import NullTracker

log = logging.getLogger(__name__)


class RunMetrics:
    def __init__(self, cfg: RunConfig, topo: Topology, tracker: NullTracker) -> None:
        self.cfg, self.topo, self.tracker = cfg, topo, tracker

    def log_startup_memory(self) -> None:
        """Rank 0's peak resident memory so far: the model built, the central pieces taken, the engine built."""
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports kB
        self.tracker.log_metrics({"perf/startup_peak_rss_mb": peak_mb}, 0)

    def evaluate(self, engine: Engine, batches: list[torch.Tensor], round_: int) -> dict[str, float]:
        """Validation perplexity of the central model seen through this round's G subnets.

        Ranks may hold unequal batch counts (even none): they sum losses and counts, so every rank
        joins the same collectives and gets the same value.
        """
        if not self.cfg.data.valid_files:  # the same answer on every rank, unlike len(batches)
            return {}
        topo = self.topo
        local = [sum(engine.eval_loss(b) for b in batches), len(batches)]
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
        metrics: dict[str, float] = {"eval/loss": mean_loss}
        kappas = self.cfg.twist.kappas
        for kappa in sorted(set(kappas), reverse=True):  # mixed kappa: one perplexity per trained size
            at_kappa = [loss for loss, k in zip(group_losses, kappas, strict=True) if k == kappa]
            metrics[f"eval/ppl_kappa_{kappa:.2f}"] = math.exp(sum(at_kappa) / len(at_kappa))
            log.info("round %d eval: ppl %.2f (kappa %.2f)", round_, metrics[f"eval/ppl_kappa_{kappa:.2f}"], kappa)
        if topo.groups > 1:
            metrics |= {f"eval/ppl_group{g}": math.exp(v) for g, v in enumerate(group_losses)}
        self.tracker.log_metrics(metrics, round_ * self.cfg.twist.local_steps)
        return metrics

    def log_round(
        self,
        round_: int,
        losses: list[float],
        compute_s: float,
        dispatch_s: float,
        aggregate_s: float,
        traffic: Traffic,
        lr: float,
        skipped_steps: int,
        distill_parts: tuple[float, float] | None = None,
    ) -> None:
        """Per-step mean losses over the world, per-group losses, speed and synchronisation of one round;
        with distillation, the round's mean cross-entropy and KL term over the world.

        Synchronisation is dispatch plus aggregation: TwIST's whole communication cost of the round.
        """
        topo, H = self.topo, self.cfg.twist.local_steps
        mine = torch.tensor(losses, device=topo.device)
        everyone = [torch.zeros(H, device=topo.device) for _ in range(topo.world_size)]
        dist.all_gather(everyone, mine)
        table = torch.stack(everyone).cpu()  # (world, H)
        first = (round_ - 1) * H
        tokens = H * self.cfg.tokens_per_rank_step * topo.world_size
        for i in range(H):
            self.tracker.log_metrics({"train/loss": table[:, i].nanmean().item()}, first + i + 1)
        by_group = table.view(topo.groups, topo.ranks_per_group * H).nanmean(dim=1)
        sync_s = dispatch_s + aggregate_s
        metrics = {
            "twist/round": round_,
            "twist/compute_seconds": compute_s,
            "twist/dispatch_seconds": dispatch_s,
            "twist/aggregate_seconds": aggregate_s,
            "twist/sync_seconds": sync_s,
            "twist/sync_share": sync_s / (compute_s + sync_s),
            "twist/sync_bytes": traffic.bytes,
            "twist/sync_collectives": traffic.collectives,
            "perf/tokens_per_s": tokens / (compute_s + sync_s),
            "train/lr": lr,
            "train/skipped_steps": skipped_steps,
        }
        metrics |= {f"train/loss_group{g}": v.item() for g, v in enumerate(by_group)}
        if distill_parts is not None:
            parts = torch.tensor(distill_parts, device=topo.device)
            dist.all_reduce(parts)
            ce, kl = (parts / topo.world_size).tolist()
            metrics |= {"train/cross_entropy": ce, "train/distill_kl": kl}
        self.tracker.log_metrics(metrics, round_ * H)
        log.info(
            "round %d/%d loss %.4f | %.0f tok/s | compute %.2fs sync %.2fs",
            round_,
            self.cfg.twist.rounds,
            table[:, -1].nanmean().item(),
            metrics["perf/tokens_per_s"],
            compute_s,
            sync_s,
        )

    def all_finite(self, tensors: Iterable[torch.Tensor]) -> bool:
        """True on every rank when no rank holds a non-finite value (a local check, one all-reduce)."""
        ok = all(bool(torch.isfinite(t).all()) for t in tensors)
        flag = torch.tensor([float(ok)], device=self.topo.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        return flag.item() == 1.0

    def groups_that_diverged(self, diverged: bool) -> list[int]:
        """Every group whose ranks saw a non-finite loss this round, the same list on every rank (one
        all-reduce of G flags over the world, once per round): all groups stop at the same point."""
        flags = torch.zeros(self.topo.groups, device=self.topo.device)
        flags[self.topo.group] = float(diverged)
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        return [g for g, flag in enumerate(flags.tolist()) if flag]
