"""Config: files, overrides, precedence, and one clear error per kind of bad value."""

from __future__ import annotations

import pytest
from helpers import BROWN_VALID, REPO, SHAKESPEARE

from twist_scale.config import ConfigError
from twist_scale.config_load import load_config
from twist_scale.config_validate import validate

BASE = [
    "--config",
    str(REPO / "configs" / "tiny_test.toml"),
    "--data.train_files",
    str(SHAKESPEARE),
    "--data.valid_files",
    str(BROWN_VALID),
]


def test_overrides_apply_and_beat_the_file():
    cfg = load_config(
        [
            *BASE,
            "--optim.lr",
            "1e-3",
            "--twist.groups=2",
            "--twist.kappa",
            "0.5",
            "--twist.shared_layers",
            "0,5",
            "--tracking.enabled",
            "false",
        ]
    )
    assert cfg.optim.lr == 1e-3 and cfg.twist.groups == 2 and cfg.twist.kappa == 0.5
    assert cfg.twist.shared_layers == [0, 5] and cfg.tracking.enabled is False
    assert cfg.data.block_size == 64  # from the file, not the default (128)
    assert cfg.total_steps == cfg.twist.rounds * cfg.twist.local_steps


@pytest.mark.parametrize(("value", "expected"), [("auto", None), ("none", []), ("", []), ("1,4", [1, 4])])
def test_shared_layers_none_means_none_as_in_export(value, expected):
    """'none' partitions every layer (as export's --shared_layers none); 'auto' is the default rule."""
    assert load_config([*BASE, "--twist.shared_layers", value]).twist.shared_layers == expected


def test_yaml_file_and_launcher_local_rank(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(f"data:\n  train_files: [{SHAKESPEARE}]\ntwist:\n  rounds: 7\n")
    cfg = load_config(["--local_rank=1", "--config", str(path), "--parallel.engine", "local"])
    assert cfg.twist.rounds == 7 and cfg.data.train_files == [str(SHAKESPEARE)]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--optim.lrr", "1"], "unknown config key 'optim.lrr'"),
        (["--bogus", "1"], "unknown config key 'bogus'"),
        (["--twist.kappa", "0"], "--twist.kappa 0.0 must be in (0, 1]"),
        (["--twist.kappa", "1.5"], "--twist.kappa 1.5 must be in (0, 1]"),
        (["--twist.kappa", "0.25", "--twist.groups", "2"], "leaves units that no group trains"),
        (["--twist.group_kappas", "1.0,0.5"], "has 2 values for --twist.groups 1: give one keep ratio per group"),
        (["--twist.groups", "2", "--twist.group_kappas", "1.0,0"], "value 0.0 (group 1) must be in (0, 1]"),
        (["--twist.groups", "2", "--twist.group_kappas", "0.5,0.25"], "keep ratios sum to 0.75 < 1"),
        (
            ["--twist.groups", "2", "--twist.kappa", "0.5", "--twist.sampling", "nested"],
            "the rest would never train; give one group the full width",
        ),
        (
            [
                "--twist.groups",
                "2",
                "--twist.kappa",
                "0.5",
                "--twist.sampling",
                "rewired",
                "--twist.correction",
                "mean",
            ],
            "keep ratios summing to 1.00: it ranks units",
        ),
        (
            ["--twist.groups", "2", "--twist.kappa", "0.75", "--twist.sampling", "rewired"],
            "set --twist.correction mean and keep ratios summing to more than 1",
        ),
        (["--twist.correction", "magic"], "choose one of none, scale, mean"),
        (["--twist.rounds", "x"], "twist.rounds: expected int, got 'x'"),
        (["--twist.rounds", "0"], "--twist.rounds 0 must be >= 1"),
        (["--data.train_files", "/nonexistent.txt"], "data file /nonexistent.txt does not exist"),
        (["--data.num_proc", "-1"], "--data.num_proc -1 must be >= 0 (0: one per core)"),
        (["--data.prepare_timeout_s", "0"], "--data.prepare_timeout_s 0.0 must be > 0"),
        (["--parallel.ds_config", "nope.json"], "--parallel.ds_config nope.json does not exist"),
        (["--optim", "1"], "'optim' is a section"),
        (["--optim.lr"], "--optim.lr needs a value"),
    ],
)
def test_bad_values_name_the_flag(args, message):
    with pytest.raises(ConfigError) as err:
        load_config([*BASE, *args])
    assert message in str(err.value)


def test_uncovered_units_allowed_explicitly():
    cfg = load_config([*BASE, "--twist.kappa", "0.25", "--twist.groups", "2", "--twist.allow_uncovered", "true"])
    assert cfg.twist.kappa * cfg.twist.groups < 1


def test_group_kappas_give_each_group_its_own_kappa():
    plain = load_config([*BASE, "--twist.groups", "2", "--twist.kappa", "0.5"])
    assert plain.twist.kappas == (0.5, 0.5) and not plain.is_dense
    sandwich = load_config([*BASE, "--twist.groups", "2", "--twist.group_kappas", "1.0,0.5"])
    assert sandwich.twist.kappas == (1.0, 0.5) and not sandwich.is_dense
    assert load_config([*BASE, "--twist.group_kappas", "1"]).is_dense


def test_empty_data_file(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.touch()
    with pytest.raises(ConfigError, match="is empty"):
        load_config([*BASE, "--data.train_files", str(empty)])


def test_world_size_must_be_a_multiple_of_groups():
    cfg = load_config([*BASE, "--twist.groups", "3", "--twist.kappa", "0.5"])
    with pytest.raises(ConfigError, match="--twist.groups 3 does not divide the world size 4"):
        validate(cfg, world_size=4)
    validate(cfg, world_size=6)


def test_help_lists_every_flag_with_its_documentation():
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, str(REPO / "launch" / "train.py"), "--help"], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    assert "--twist.kappa (default: 1.0)" in proc.stdout and "Keep ratio in (0, 1]" in proc.stdout
    assert "--parallel.precision {fp32, bf16}" in proc.stdout and "cpu:gloo,cuda:nccl" in proc.stdout
    assert "--twist.shared_layers (default: auto)" in proc.stdout  # as the README and the flag spell it


@pytest.mark.parametrize("preset", sorted(p.name for p in (REPO / "configs").glob("*.toml")))
def test_every_preset_loads(preset, monkeypatch):
    monkeypatch.chdir(REPO)  # the default data root is relative to the checkout
    monkeypatch.delenv("TWIST_DATA_ROOT", raising=False)
    cfg = load_config(["--config", f"configs/{preset}"])
    assert cfg.data.train_files and cfg.data.root == "../shared/data"
    assert all(f.startswith("../shared/data/") for f in cfg.data.train_files + cfg.data.valid_files)


def test_presets_find_their_data_under_one_root(tmp_path, monkeypatch):
    for root in ("env", "flag"):
        (tmp_path / root / "brown").mkdir(parents=True)
        for split in ("train", "valid"):
            (tmp_path / root / "brown" / f"{split}.txt").write_text("some text\n")
    monkeypatch.chdir(REPO)
    monkeypatch.setenv("TWIST_DATA_ROOT", str(tmp_path / "env"))
    from_env = load_config(["--config", "configs/twist_brown.toml"])
    assert from_env.data.train_files == [f"{tmp_path}/env/brown/train.txt"]
    flag = load_config(["--config", "configs/twist_brown.toml", "--data.root", str(tmp_path / "flag")])
    assert flag.data.valid_files == [f"{tmp_path}/flag/brown/valid.txt"]
