"""One module per command (train, prepare_data, export, evaluate, compare, replay), each `main(argv)` with `--help`.

Console scripts (`twist-train`, ...) and `launch/*.py` call these. Every command's flags follow one
dialect: underscores inside names, `--section.key` for what training configures (`--tracking.uri`),
defaults shown in `--help`.
"""

from __future__ import annotations

import argparse
import sys

from twist_scale.config import ConfigError, RunConfig
from twist_scale.config_load import help_text, load_config


class _DefaultsShown(argparse.HelpFormatter):
    """Appends `(default: X)` to a flag's help, unless the help already says what the default is or it
    has none (a required flag, a switch, or a flag whose absence the help explains)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        unset = action.default is None or action.default is False or action.default is argparse.SUPPRESS
        if "(default" in text or unset or not action.option_strings:
            return text
        return f"{text} (default: %(default)s)"


def parser_for(command: str, doc: str | None) -> argparse.ArgumentParser:
    """An argument parser in the commands' dialect: the command's docstring, defaults shown in --help."""
    return argparse.ArgumentParser(prog=command, description=doc, formatter_class=_DefaultsShown)


def run_config(command: str, argv: list[str] | None) -> RunConfig | None:
    """The config of a command that takes training's flags; None once `--help` is printed.

    A bad value ends the command with one line, before any work.
    """
    argv = sys.argv[1:] if argv is None else argv
    if {"-h", "--help"} & set(argv):
        print(help_text(command))
        return None
    try:
        return load_config(argv)
    except ConfigError as err:
        sys.exit(f"config error: {err}")
