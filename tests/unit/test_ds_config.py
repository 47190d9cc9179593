"""Every ds_configs/*.json renders against a run config; run-owned keys are refused."""

from __future__ import annotations

import json

import pytest
from helpers import REPO, SHAKESPEARE

from twist_scale.config import ConfigError
from twist_scale.config_load import load_config
from twist_scale.engines.deepspeed_engine import render_ds_config

CONFIGS = sorted((REPO / "ds_configs").glob("*.json"))


def _cfg(*args):
    return load_config(["--data.train_files", str(SHAKESPEARE), "--data.micro_batch_size", "4", *args])


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_ds_config_renders(path):
    rendered = render_ds_config(str(path), _cfg("--parallel.precision", "bf16", "--optim.grad_clip", "0.5"), 2)
    assert "auto" not in json.dumps(rendered)
    assert rendered["train_micro_batch_size_per_gpu"] == 4 and rendered["train_batch_size"] == 8
    assert rendered["gradient_clipping"] == 0.5 and rendered["bf16"]["enabled"] is True
    assert rendered["zero_optimization"]["stage"] in (0, 1, 2, 3)


def test_optimizer_in_json_is_refused(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"optimizer": {"type": "Adam"}}))
    with pytest.raises(ConfigError, match="'optimizer' is set by the run config"):
        render_ds_config(str(path), _cfg(), 1)


def test_unknown_auto_is_refused(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 2, "reduce_bucket_size": "auto"}}))
    with pytest.raises(ConfigError, match="zero_optimization.reduce_bucket_size' is 'auto'"):
        render_ds_config(str(path), _cfg(), 1)
