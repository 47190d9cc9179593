"""The manifest that vouches for a checkpoint directory, read without torch or a process group.

Whether a checkpoint is complete and intact, and whether a run may resume it, is asked before any
process group exists (`twist-train` refuses a conflicting out_dir at once) as well as by every rank on
resume; the writer (`checkpoint.py`) and these readers share one definition of the checksums.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from twist_scale.config import RunConfig, to_dict

MANIFEST = "manifest.json"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def file_digests(directory: Path, files: list[Path]) -> dict[str, str]:
    """Each file's checksum by its path under `directory`: a rank's share of the manifest's files."""
    return {str(p.relative_to(directory)): _sha256(p) for p in files}


def verify(directory: Path, share: tuple[int, int] = (0, 1)) -> str | None:
    """None when the checkpoint is complete and intact, else what is wrong with it.

    share (i, n): check only every n-th file of the manifest from the i-th, so n ranks split the work.
    """
    manifest = directory / MANIFEST
    if not manifest.exists():
        return "no manifest (partial write)"
    try:
        files = json.loads(manifest.read_text())["files"]
    except (json.JSONDecodeError, KeyError) as err:
        return f"unreadable manifest ({err})"
    index, count = share
    for rel, digest in sorted(files.items())[index::count]:
        path = directory / rel
        if not path.exists():
            return f"missing file {rel}"
        if _sha256(path) != digest:
            return f"checksum mismatch in {rel}"
    return None


def complete_checkpoints(root: Path) -> list[Path]:
    """The checkpoints under `root` whose manifest was written, oldest first."""
    return sorted(p for p in root.glob("round_*") if (p / MANIFEST).exists())


def resume_conflict(cfg: RunConfig) -> str | None:
    """Why this run cannot resume the checkpoints in its out_dir (None: it can, or there are none).

    Another engine cannot read the engine's files, another model cannot load the central shards, and a
    dense run keeps its model where a TwIST run does not: refused before anything is written, from the
    newest manifest alone (no process group needed). Another G x R is not a conflict (elastic resume).
    """
    manifests = sorted((Path(cfg.out_dir) / "checkpoints").glob(f"round_*/{MANIFEST}"))
    if not cfg.checkpoint.resume or not manifests:
        return None
    saved, wanted = json.loads(manifests[-1].read_text())["config"], to_dict(cfg)

    def kind(c: dict[str, Any]) -> str:
        kappas = list(c["twist"]["group_kappas"] or [c["twist"]["kappa"]] * c["twist"]["groups"])
        return "dense" if kappas == [1.0] else "TwIST"

    differences = []
    if saved["parallel"]["engine"] != wanted["parallel"]["engine"]:
        differences.append(f"--parallel.engine {saved['parallel']['engine']}, not {wanted['parallel']['engine']}")
    differences += [
        f"--model.{key} {saved['model'][key]!r}, not {wanted['model'][key]!r}"
        for key in saved["model"]
        if saved["model"][key] != wanted["model"].get(key)
    ]
    if kind(saved) != kind(wanted):
        differences.append(f"a {kind(saved)} run, not a {kind(wanted)} one")
    if not differences:
        return None
    return (
        f"--out_dir {cfg.out_dir} holds checkpoints of another run ({'; '.join(differences)}): resume it with "
        "its own settings, give this run its own --out_dir, or pass --checkpoint.resume false to start afresh there"
    )
