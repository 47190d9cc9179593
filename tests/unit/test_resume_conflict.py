"""A run refuses, in one line and before writing anything, to resume checkpoints it cannot read."""

from __future__ import annotations

import json

import pytest
from helpers import REPO

from twist_scale.checkpoint_manifest import MANIFEST, resume_conflict
from twist_scale.commands.train import main as train
from twist_scale.config import CheckpointConfig, ModelConfig, ParallelConfig, RunConfig, TwistConfig, to_dict


def saved_run(tmp_path, **sections) -> RunConfig:
    """A run directory whose newest checkpoint was written by the run `sections` configure."""
    cfg = RunConfig(out_dir=str(tmp_path), **sections)
    for round_ in (1, 2):
        checkpoint = tmp_path / "checkpoints" / f"round_{round_:06d}"
        checkpoint.mkdir(parents=True)
        (checkpoint / MANIFEST).write_text(json.dumps({"round": round_, "files": {}, "config": to_dict(cfg)}))
    return cfg


def test_another_engine_model_or_kind_of_run_is_a_conflict_another_layout_is_not(tmp_path):
    twist = TwistConfig(groups=2, kappa=0.5)
    saved_run(tmp_path, parallel=ParallelConfig(engine="deepspeed"), twist=twist)

    def conflict(**sections) -> str | None:
        return resume_conflict(RunConfig(out_dir=str(tmp_path), **{"twist": twist, **sections}))

    assert conflict() is None
    assert conflict(twist=TwistConfig(groups=4, kappa=0.5)) is None  # elastic resume at another G x R
    assert "--parallel.engine deepspeed, not fsdp" in conflict(parallel=ParallelConfig(engine="fsdp"))
    assert "--model.size 'tiny', not 'small'" in conflict(model=ModelConfig(size="small"))
    assert "a TwIST run, not a dense one" in conflict(twist=TwistConfig(groups=1, kappa=1.0))
    assert conflict(parallel=ParallelConfig(engine="fsdp"), checkpoint=CheckpointConfig(resume=False)) is None
    assert resume_conflict(RunConfig(out_dir=str(tmp_path / "fresh"))) is None


def test_train_exits_with_one_line_and_leaves_the_run_as_it_was(tmp_path, capsys):
    saved_run(tmp_path, parallel=ParallelConfig(engine="deepspeed"))
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(SystemExit) as exit_:
        train(
            ["--config", str(REPO / "configs" / "tiny_test.toml"), "--out_dir", str(tmp_path)]
            + ["--parallel.engine", "fsdp"]
        )
    message = str(exit_.value.code)
    assert message.startswith(f"error: --out_dir {tmp_path} holds checkpoints of another run") and "\n" not in message
    assert "--checkpoint.resume false" in message
    assert (tmp_path / "config.json").read_text() == "{}"
