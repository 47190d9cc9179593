"""A checkpoint written at one G x R resumes at another: the central model is resharded exactly,
the round and the schedule carry over, and training goes on there."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import TRAIN, history, mlflow_run, run_deepspeed, tiny_args
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


@pytest.mark.slow
@pytest.mark.parametrize(
    ("before", "after"),
    [((4, 2, "deepspeed"), (2, 2, "deepspeed")), ((2, 2, "local"), (4, 4, "local"))],
    ids=["2x2-to-2x1", "2x1-to-4x1"],
)
def test_resume_at_another_world(tmp_path, before, after):
    (world, groups, engine), (new_world, new_groups, new_engine) = before, after
    out = tmp_path / "run"
    first = dict(TWIST, twist__groups=groups, parallel__engine=engine)
    run_deepspeed(world, TRAIN, tiny_args(out, **first, twist__rounds=2))
    saved = exported(out / "final")

    # the same round at the other world: nothing is left to train, so the export is the resharded central model
    moved = dict(TWIST, twist__groups=new_groups, parallel__engine=new_engine)
    proc = run_deepspeed(new_world, TRAIN, tiny_args(out, **moved, twist__rounds=2))
    assert "at round 2 (resharded)" in proc.stdout + proc.stderr
    again = exported(out / "final")
    assert again.keys() == saved.keys()
    assert all(torch.equal(again[k], saved[k]) for k in saved), "resharding changed the central model"

    # and training goes on at the new world, on the whole run's schedule
    run_deepspeed(new_world, TRAIN, tiny_args(out, **moved, twist__rounds=4))
    client, run = mlflow_run(out)
    assert history(client, run, "twist/round")[-2:] == [3.0, 4.0]
    lr = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "train/lr")}
    assert lr[6] == pytest.approx(scheduled_lr(6, total=8), rel=1e-6)  # a fresh schedule would be at step 2
    assert all(torch.isfinite(torch.tensor(history(client, run, "train/loss"))))
