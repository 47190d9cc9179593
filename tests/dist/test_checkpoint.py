"""Checkpoints on a gloo process group: corrupted or partial rounds are skipped, old rounds pruned, and
checkpoint I/O waits under its own timeout."""

from __future__ import annotations

import json

import pytest
import torch
import torch.distributed as dist
from helpers.dist import run_on_ranks

from twist_scale.checkpoint import Checkpointer
from workers.checkpoint_io import slow_hash_under_a_short_collective_timeout


def test_corrupted_or_partial_checkpoints_are_skipped(tmp_path, caplog):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        ckpt = Checkpointer(tmp_path / "ckpt", rank=0, keep_last=5, device=torch.device("cpu"))
        for r in (1, 2, 3):
            ckpt.save(r, lambda d, r=r: torch.save({"round": r}, d / "state.pt"), {})
        assert ckpt.latest_valid().name == "round_000003"
        with open(tmp_path / "ckpt" / "round_000003" / "state.pt", "r+b") as fh:  # flip bytes on disk
            fh.seek(40)
            fh.write(b"\x00\xff\x00\xff")
        (tmp_path / "ckpt" / "round_000004").mkdir()  # a partial write: no manifest
        assert ckpt.latest_valid().name == "round_000002"
        assert "checksum mismatch" in caplog.text and "no manifest" in caplog.text
        ckpt.save(5, lambda d: torch.save({}, d / "state.pt"), {})
        ckpt.keep_last = 2
        ckpt.save(6, lambda d: torch.save({}, d / "state.pt"), {})
        assert [p.name for p in ckpt.complete()] == ["round_000005", "round_000006"]
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_checkpoint_io_slower_than_the_collective_timeout_completes(tmp_path):
    """Each rank checksums its own files, and ranks wait for each other's I/O under
    --checkpoint.timeout_s: a 3 s checksum under a 2 s collective timeout is not a hang."""
    run_on_ranks(slow_hash_under_a_short_collective_timeout, 2, str(tmp_path / "ckpt"), group=False)
    manifest = json.loads((tmp_path / "ckpt" / "round_000001" / "manifest.json").read_text())
    assert sorted(manifest["files"]) == ["rank_00000.pt", "rank_00001.pt"]
