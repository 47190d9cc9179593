"""Distilled TwIST runs on in-process gloo ranks: the central model as teacher, then that run's export as a
stored top-k teacher; each logs its loss parts, and the logged loss is their sum."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import history, mlflow_run, tiny_args
from helpers.dist import run_on_ranks, train_on_ranks

from twist_scale.pruning.pruner import SavedCentral


def _check_parts(out, rounds: int, steps: int, weight: float, temperature: float) -> list[float]:
    client, run = mlflow_run(out)
    ce, kl = history(client, run, "train/cross_entropy"), history(client, run, "train/distill_kl")
    losses = history(client, run, "train/loss")
    assert len(ce) == len(kl) == rounds and len(losses) == rounds * steps
    assert all(k > 0 for k in kl), kl  # the subnets differ from their teacher
    for r in range(rounds):  # each step's loss is the mean over the world of CE + weight T^2 KL
        mean = sum(losses[r * steps : (r + 1) * steps]) / steps
        assert mean == pytest.approx(ce[r] + weight * temperature**2 * kl[r], rel=1e-5), (r, mean, ce, kl)
    return kl


def test_central_and_stored_teachers_train_and_log_both_loss_parts(tmp_path):
    common = dict(twist__groups=2, twist__kappa=0.5, twist__rounds=2, twist__local_steps=2, checkpoint__every_rounds=0)
    central = tmp_path / "central"
    train_on_ranks(2, tiny_args(central, twist__distill="central", twist__distill_temperature=2.0, **common))
    _check_parts(central, 2, 2, 1.0, 2.0)

    stored = tmp_path / "stored"
    teacher = central / "final"  # a full-width model on the same tokenizer
    distill = dict(twist__distill="stored", twist__distill_teacher=teacher, twist__distill_top_k=4)
    args = tiny_args(stored, twist__distill_weight=0.5, **distill, **common)
    train_on_ranks(2, args)
    _check_parts(stored, 2, 2, 0.5, 1.0)
    cache = Path(args[args.index("--data.cache_dir") + 1])
    (written,) = [
        d for d in cache.glob("teacher-*") if json.loads((d / "teacher.json").read_text())["teacher"] == str(teacher)
    ]
    assert sorted(p.name for p in written.glob("*.npy")) == [
        "ids-00000.npy",
        "ids-00001.npy",
        "logits-00000.npy",
        "logits-00001.npy",
    ]  # each rank's own training blocks


def test_the_central_teacher_sharded_by_fsdp_teaches_as_under_zero1(tmp_path):
    """One group on two ranks: FSDP2 shards the full-width teacher like the student, ZeRO-1 keeps it whole
    on each rank; the same seed gives the same distilled losses and KL terms step for step."""
    common = dict(
        twist__groups=1,
        twist__kappa=0.5,
        twist__allow_uncovered="true",
        twist__rounds=2,
        twist__local_steps=2,
        twist__distill="central",
        eval__every_rounds=0,
        checkpoint__every_rounds=0,
    )
    runs = {engine: tmp_path / engine for engine in ("deepspeed", "fsdp")}
    for engine, out in runs.items():
        train_on_ranks(2, tiny_args(out, parallel__engine=engine, **common))
    zero1, fsdp = (
        {key: history(*mlflow_run(out), key) for key in ("train/loss", "train/distill_kl")} for out in runs.values()
    )
    for key, values in zero1.items():
        assert len(values) == len(fsdp[key]) > 0
        assert fsdp[key] == pytest.approx(values, rel=1e-4, abs=1e-5), key
    assert min(zero1["train/distill_kl"]) > 0


def _teacher_logits_after_training(rank: int, world: int, argv: list[str], found: str) -> None:
    from twist_scale.commands import run_config
    from twist_scale.trainer import Trainer

    trainer = Trainer(run_config("twist-train", argv))
    trainer.train()
    trainer.teacher.dispatch()  # the central model as the run ends: what `final/` holds
    batch = torch.randint(0, 512, (2, 32), generator=torch.Generator().manual_seed(0))
    logits = trainer.teacher.engine.logits(batch)
    if rank == 0:
        torch.save({"batch": batch, "logits": logits.float().cpu()}, found)


def test_the_central_teacher_is_the_central_model(tmp_path):
    """The teacher's logits are the exported central model's: every tensor dispatched, and every buffer start-up
    computes (rotary frequencies) as the model has it, not left as allocated."""
    out, found = tmp_path / "run", tmp_path / "teacher.pt"
    common = dict(twist__groups=2, twist__kappa=0.5, twist__rounds=2, twist__local_steps=2, twist__distill="central")
    args = tiny_args(out, twist__correction="mean", checkpoint__every_rounds=0, **common)
    run_on_ranks(_teacher_logits_after_training, 2, args, str(found), group=False)
    taught = torch.load(found)
    with torch.no_grad():
        central = SavedCentral.load(out / "final").model(input_ids=taught["batch"]).logits
    assert torch.allclose(taught["logits"], central, atol=1e-4), (taught["logits"] - central).abs().max()
