"""`twist-train`: one process per rank, under any launcher (`deepspeed launch/train.py`, torchrun, srun)."""

from __future__ import annotations

import sys

from twist_scale.checkpoint import resume_conflict
from twist_scale.config import ConfigError
from twist_scale.config_load import help_text, load_config


def main(argv: list[str] | None = None) -> None:
    """`twist-train --config FILE [--section.key V]`: one process per rank, under any launcher."""
    argv = sys.argv[1:] if argv is None else argv
    if {"-h", "--help"} & set(argv):
        print(help_text("twist-train"))
        return
    try:
        cfg = load_config(argv)
    except ConfigError as err:
        sys.exit(f"config error: {err}")
    conflict = resume_conflict(cfg)
    if conflict:
        sys.exit(f"error: {conflict}")
    from twist_scale.distributed import close_distributed
    from twist_scale.run_model import check_pretrained
    from twist_scale.trainer import Trainer

    try:
        check_pretrained(cfg)
    except ConfigError as err:
        sys.exit(f"config error: {err}")

    try:
        Trainer(cfg).train()
    finally:
        close_distributed()
