"""Failures in a real run that never hang or lose work: a stuck rank ends the run within the collective
timeout; non-finite losses and weights stop the loop, naming the phase, and no NaN checkpoint is ever
written. (A skipped step inside one engine: unit/test_nonfinite_steps.py.)"""

from __future__ import annotations

import os
import signal
import time

from helpers import tiny_args
from helpers.dist import run_on_ranks, train_on_ranks

DIVERGING = dict(parallel__engine="local", optim__lr="1e30", optim__warmup_steps=0)


def test_nonfinite_loss_stops_without_a_nan_checkpoint(tmp_path):
    out = tmp_path / "stop"
    ranks = train_on_ranks(1, tiny_args(out, **DIVERGING), may_fail=True)
    assert (
        "failed in phase 'local step'" in ranks.failures[0]
        and "FloatingPointError: non-finite loss" in (ranks.failures[0])
    )
    assert not list((out / "checkpoints").glob("round_*"))


def test_nonfinite_weights_never_reach_a_checkpoint(tmp_path):
    """--on_nonfinite skip survives NaN losses, but a finite loss with overflowing gradients can still
    poison the weights: the checkpoint guard stops the run rather than write them."""
    out = tmp_path / "skip"
    ranks = train_on_ranks(1, tiny_args(out, on_nonfinite="skip", **DIVERGING), may_fail=True)
    assert "non-finite loss, step skipped" in ranks.output
    assert "failed in phase 'checkpoint'" in ranks.failures[0] and "refusing to overwrite" in ranks.failures[0]
    assert not list((out / "checkpoints").glob("round_*"))


def stop_rank_one_after_its_first_checkpoint(rank: int, world: int, argv: list[str]) -> None:
    """`twist-train argv`, with rank 1 frozen (alive, never answering) once round 1 is saved."""
    from twist_scale.checkpoint import Checkpointer
    from twist_scale.commands.train import main as train

    if rank == 1:
        save = Checkpointer.save_run

        def save_then_freeze(self, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
            path = save(self, *args, **kwargs)
            os.kill(os.getpid(), signal.SIGSTOP)
            return path

        Checkpointer.save_run = save_then_freeze
    train(argv)


def test_a_stuck_rank_ends_the_run_within_the_timeout_naming_rank_and_phase(tmp_path):
    args = tiny_args(tmp_path / "stuck", twist__groups=2, twist__kappa=0.5, twist__rounds=200, parallel__timeout_s=8)
    start = time.monotonic()
    ranks = run_on_ranks(stop_rank_one_after_its_first_checkpoint, 2, args, group=False, may_fail=True, timeout=120)
    assert "rank 0 (group 0) failed in phase" in ranks.failures[0], ranks.failures
    assert time.monotonic() - start < 60  # the 8 s collective timeout, not the 200 rounds


def diverge_in_group_one_at_step_four(rank: int, world: int, argv: list[str]) -> None:
    """`twist-train argv`, with every loss of rank 1 (group 1 of 2 x 1) non-finite from its 4th step on."""
    import itertools

    from twist_scale.commands.train import main as train
    from twist_scale.engines.base import Engine

    if rank == 1:
        step, calls = Engine.train_step, itertools.count(1)

        def diverging(self, input_ids):  # noqa: ANN001, ANN202
            return float("nan") if next(calls) >= 4 else step(self, input_ids)

        Engine.train_step = diverging
    train(argv)


def test_a_nonfinite_loss_in_one_group_stops_every_group_at_the_same_round(tmp_path):
    out = tmp_path / "one-group"
    args = tiny_args(out, twist__groups=2, twist__kappa=0.5, twist__rounds=3, parallel__timeout_s=60)
    start = time.monotonic()
    ranks = run_on_ranks(diverge_in_group_one_at_step_four, 2, args, group=False, may_fail=True, timeout=180)
    assert sorted(ranks.failures) == [0, 1], ranks.failures  # group 0 stops too, not at the collective timeout
    for trace in ranks.failures.values():
        assert "failed in phase 'local step' at round 1" in trace and "non-finite loss in group(s) 1;" in trace
    assert time.monotonic() - start < 50
    assert [p.name for p in (out / "checkpoints").glob("round_*")] == ["round_000001"]
