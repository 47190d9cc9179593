"""One flag dialect across the commands: `--section.key` for what training configures, underscores inside names."""

from __future__ import annotations

import re
from collections.abc import Callable

import pytest

from twist_scale.commands import compare, evaluate, export, replay
from twist_scale.config_load import help_text
from twist_scale.pruning.methods import method


def help_of(main: Callable[[list[str]], None], capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    return capsys.readouterr().out


COMMANDS = {"export": export.main, "evaluate": evaluate.main, "compare": compare.main, "replay": replay.main}


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_flags_are_spelled_as_in_training(name, capsys):
    text = help_of(COMMANDS[name], capsys)
    flags = set(re.findall(r"(?<![\w-])--[\w.-]+", text)) - {"--help"}
    assert flags, text
    assert not [f for f in flags if "-" in f[2:]], f"{name}: hyphenated flags {sorted(flags)}"
    if name != "export":  # every command that talks to MLflow names the store as training does
        assert "--tracking.uri" in flags
    if name in ("export", "evaluate"):  # κ as training spells it, or short
        assert {"--kappa", "--twist.kappa"} <= flags


def test_training_help_names_the_same_tracking_flags():
    text = help_text("twist-train")
    assert "--tracking.uri" in text and "--tracking.experiment" in text
    assert "--twist.shared_layers" in text


def test_calibration_defaults_to_each_reference_setting():
    """FLAP calibrates on 1024 windows of 128 tokens, its Wanda-sp on 128 of 128, LLM-Pruner's Taylor on 10 of 64."""
    assert export.calibration_setting(method("flap"), None, None) == (1024, 128)
    assert export.calibration_setting(method("flap_uniform"), None, None) == (1024, 128)
    assert export.calibration_setting(method("wanda_sp"), None, None) == (128, 128)
    assert export.calibration_setting(method("taylor"), None, None) == (10, 64)
    assert export.calibration_setting(method("flap"), 32, 256) == (32, 256)
