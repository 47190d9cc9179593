"""`twist-prepare-data`: tokenise a run's data once, with every core, before any rank starts.

Takes the same config and flags as `twist-train` and writes what rank 0 of that run would: the
tokenizer (trained if there is none) and each split's token file in the cache (docs/data.md). A launch
then finds them and starts in seconds; training prepares them itself when they are missing.
"""

from __future__ import annotations

import sys

from twist_scale.commands import run_config
from twist_scale.logs import setup_logging


def main(argv: list[str] | None = None) -> None:
    """`twist-prepare-data --config FILE [--section.key V]`: the tokenizer and token files of that run."""
    cfg = run_config("twist-prepare-data", argv)
    if cfg is None:
        return
    setup_logging()
    from twist_scale.data import prepare_data
    from twist_scale.token_files import read_index

    try:
        prepared = prepare_data(cfg)
    except (ValueError, FileNotFoundError) as err:  # a corpus or tokenizer that cannot be used: one line
        sys.exit(f"error: {err}")
    print(f"tokenizer: {prepared.tokenizer_dir}")
    for split, index in (("train", prepared.train), ("validation", prepared.valid)):
        if index is not None:
            meta = read_index(index)
            print(f"{split}: {meta['tokens']:,} tokens in {meta['documents']:,} documents ({meta['dtype']}) {index}")
