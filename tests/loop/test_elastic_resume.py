"""A checkpoint written at one G x R resumes at another: the central model is resharded exactly,
the round and the schedule carry over, and training goes on there."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import history, mlflow_run, tiny_args
from helpers.dist import train_on_ranks
from safetensors.torch import load_file

from twist_scale.config import OptimConfig
from twist_scale.engines.base import build_scheduler

TWIST = dict(
    twist__kappa=0.5,
    twist__correction="mean",
    twist__optimizer_state="aggregate",
    twist__local_steps=2,
    eval__every_rounds=0,
    optim__warmup_steps=2,
)


def exported(final: Path) -> dict[str, torch.Tensor]:
    return {f"{p.name}:{k}": v for p in sorted(final.glob("*.safetensors")) for k, v in load_file(p).items()}


def scheduled_lr(steps: int, total: int) -> float:
    """The learning rate the run's schedule gives after `steps` steps of `total`."""
    cfg = OptimConfig(lr=3e-3, warmup_steps=2)
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=cfg.lr)
    schedule = build_scheduler(optimizer, cfg, total)
    for _ in range(steps):
        optimizer.step()
        schedule.step()
    return schedule.get_last_lr()[0]


def test_resharded_central_model_is_exact(tmp_path):
    """2 groups x 2 ranks -> 2 x 1 under DeepSpeed, at the saved round: nothing is left to train, so the
    export is the resharded central model, bit for bit."""
    out = tmp_path / "run"
    train_on_ranks(4, tiny_args(out, **TWIST, twist__groups=2, twist__rounds=2))
    saved = exported(out / "final")
    ranks = train_on_ranks(2, tiny_args(out, **TWIST, twist__groups=2, twist__rounds=2))
    assert "at round 2 (resharded)" in ranks.output
    again = exported(out / "final")
    assert again.keys() == saved.keys()
    assert all(torch.equal(again[k], saved[k]) for k in saved), "resharding changed the central model"


def test_training_goes_on_at_another_world_on_the_whole_runs_schedule(tmp_path):
    """2 groups x 1 rank -> 4 x 1 (one process per group): the round, the schedule and training carry on."""
    out = tmp_path / "run"
    train_on_ranks(2, tiny_args(out, **TWIST, twist__groups=2, parallel__engine="local", twist__rounds=2))
    ranks = train_on_ranks(4, tiny_args(out, **TWIST, twist__groups=4, parallel__engine="local", twist__rounds=4))
    assert "at round 2 (resharded)" in ranks.output
    client, run = mlflow_run(out)
    assert history(client, run, "twist/round") == [1.0, 2.0, 3.0, 4.0]
    lr = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "train/lr")}
    assert lr[6] == pytest.approx(scheduled_lr(6, total=8), rel=1e-6)  # a fresh schedule would be at step 2
    assert all(torch.isfinite(torch.tensor(history(client, run, "train/loss"))))
