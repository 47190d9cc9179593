"""One module per command (train, export, evaluate, compare, replay), each `main(argv)` with `--help`.

Console scripts (`twist-train`, ...) and `launch/*.py` call these. Every command's flags follow one
dialect: underscores inside names, `--section.key` for what training configures (`--tracking.uri`),
defaults shown in `--help`.
"""

from __future__ import annotations

import argparse


def parser_for(command: str, doc: str | None) -> argparse.ArgumentParser:
    """An argument parser in the commands' dialect: the command's docstring, defaults shown in --help."""
    return argparse.ArgumentParser(
        prog=command, description=doc, formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
