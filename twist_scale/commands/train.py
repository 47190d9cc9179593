"""`twist-train`: one process per rank, under any launcher (`deepspeed launch/train.py`, torchrun, srun)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from twist_scale.checkpoint_manifest import complete_checkpoints, resume_conflict
from twist_scale.commands import run_config
from twist_scale.config import ConfigError, RunConfig
from twist_scale.interrupts import install as install_interrupts
from twist_scale.interrupts import stop_reason


def main(argv: list[str] | None = None) -> None:
    """`twist-train --config FILE [--section.key V]`: one process per rank, under any launcher."""
    cfg = run_config("twist-train", argv)
    if cfg is None:
        return
    conflict = resume_conflict(cfg)
    if conflict:
        sys.exit(f"error: {conflict}")
    from twist_scale.distributed import close_distributed
    from twist_scale.run_model import check_pretrained
    from twist_scale.trainer import Trainer

    install_interrupts()
    try:
        check_pretrained(cfg)
        Trainer(cfg).train()
    except ConfigError as err:  # found at start-up, before any work: one line
        sys.exit(f"config error: {err}")
    except BaseException as err:
        reason = stop_reason(err)
        if reason is None:
            raise
        if os.environ.get("RANK", "0") == "0":
            print(f"stopped ({reason}): {resume_hint(cfg)}", file=sys.stderr)
        sys.exit(130)
    finally:
        close_distributed()


def resume_hint(cfg: RunConfig) -> str:
    """What a rerun of the same command will do."""
    done = complete_checkpoints(Path(cfg.out_dir) / "checkpoints")
    if done and cfg.checkpoint.resume:
        return f"rerun the same command to resume from {done[-1]}"
    return f"no checkpoint in {cfg.out_dir} yet; a rerun starts afresh"
