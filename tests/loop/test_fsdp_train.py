"""FSDP2 on in-process ranks: TwIST runs that must reproduce the DeepSpeed ZeRO-1 engine's losses
step for step (the engine's read/write against a single-process oracle is dist/test_fsdp_engine.py).
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
from helpers import tiny_args
from helpers.dist import train_on_ranks


def loss_history(out_dir: Path) -> list[tuple[int, float]]:
    """(step, train/loss) pairs of the run's MLflow run, from the sqlite store in its out_dir."""
    from mlflow.tracking import MlflowClient

    from twist_scale.tracking import default_uri

    client = MlflowClient(default_uri(out_dir))
    run_id = (out_dir / "mlflow_run_id").read_text().strip()
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, "train/loss"))


@pytest.mark.parametrize(
    ("layout", "resume"),
    [
        # Two groups of one rank, aggregation across them.
        ({"twist__groups": 2, "twist__kappa": 0.5}, False),
        # One group sharded over two ranks, with uneven shards (ceil(0.3 * 128) = 39 MLP rows),
        # optimizer moments carried through dispatch/aggregation, and a resume.
        (
            {
                "twist__groups": 1,
                "twist__kappa": 0.3,
                "twist__allow_uncovered": "true",
                "twist__optimizer_state": "aggregate",
            },
            True,
        ),
    ],
    ids=["G2xR1", "G1xR2-uneven-moments-resume"],
)
def test_twist_losses_match_deepspeed(tmp_path, layout, resume):
    """Same seed and config: the FSDP2 and DeepSpeed ZeRO-1 engines give the same TwIST losses.

    With `resume`, the FSDP run is then resumed from its round-2 checkpoint (the round-3 one
    removed, as if the job had died): the replayed round must give the same loss again (its log
    line; the MLflow run keeps the first attempt's values, one per step), which checks the sharded
    save/load and that a resumed run keeps logging into the same MLflow run.
    """
    common = {**layout, "eval__every_rounds": 0}
    ds_dir, fsdp_dir = tmp_path / "ds", tmp_path / "fsdp"
    train_on_ranks(2, tiny_args(ds_dir, parallel__engine="deepspeed", **common))
    train_on_ranks(2, tiny_args(fsdp_dir, parallel__engine="fsdp", **common))
    steps = list(range(1, 10))
    if resume:
        shutil.rmtree(fsdp_dir / "checkpoints" / "round_000003")
        resumed = train_on_ranks(2, tiny_args(fsdp_dir, parallel__engine="fsdp", **common))
        assert "resumed from" in resumed.output
        replayed = re.search(r"round 3/3 loss (\d+\.\d+)", resumed.output)  # the store keeps each step once
        assert replayed is not None, resumed.output[-2000:]

    ds = dict(loss_history(ds_dir))
    fsdp = loss_history(fsdp_dir)
    assert sorted(ds) == list(range(1, 10))
    assert [s for s, _ in fsdp] == steps
    for step, value in fsdp:
        assert value == pytest.approx(ds[step], rel=1e-4, abs=1e-5), f"step {step}: {value} vs deepspeed {ds[step]}"
    if resume:  # the log line rounds to 4 decimals
        assert float(replayed[1]) == pytest.approx(ds[9], abs=1e-4), f"replayed {replayed[1]} vs deepspeed {ds[9]}"
