"""Device-correct collectives: whole runs under a process group that, like NCCL, serves one device type.

`tests/helpers/strict_device.py` registers the 'strict' backend (lazy-device tensors only, NCCL's error
for any other; dist/test_strict_device.py checks that it refuses). A host tensor in any trainer
collective — resume hash, dispatch, aggregation, evaluation, logging, checkpoint, export — fails these
runs as it would fail a GPU job. Sharded evaluation over validation shards of unequal length runs here too.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import BROWN_VALID, SHAKESPEARE, history, mlflow_run, tiny_args
from helpers.dist import train_on_ranks

from twist_scale.data import packed_blocks
from twist_scale.tokenizer import load_tokenizer, train_tokenizer

TWIST = dict(
    parallel__backend="strict",
    parallel__engine="local",  # one process per group: every collective in the run is the trainer's
    twist__groups=2,
    twist__group_kappas="1.0,0.5",  # a sandwich: group 0 trains the full width, group 1 half
    twist__correction="mean",
    twist__optimizer_state="aggregate",
    twist__local_steps=2,
    eval__every_rounds=1,
)


def test_twist_run_resume_and_export_under_single_device_backend(tmp_path):
    out = tmp_path / "twist"
    train_on_ranks(2, tiny_args(out, twist__rounds=2, **TWIST))
    assert json.loads((out / "final" / "twist.json").read_text())["rounds"] == 2
    # a longer schedule in the same out_dir resumes from round 2: the resume hash check included
    ranks = train_on_ranks(2, tiny_args(out, twist__rounds=3, **TWIST))
    assert "resumed from" in ranks.output
    client, run = mlflow_run(out)
    assert len(history(client, run, "train/loss")) == 6  # 3 rounds of 2 steps, in the one MLflow run
    assert {"eval/ppl_kappa_0.50", "eval/ppl_group1", "twist/sync_bytes"} <= set(run.data.metrics)
    metrics = run.data.metrics  # one perplexity per trained size
    assert metrics["eval/ppl_kappa_1.00"] == pytest.approx(metrics["eval/ppl_group0"])
    assert metrics["eval/ppl_kappa_0.50"] == pytest.approx(metrics["eval/ppl_group1"])
    assert metrics["eval/ppl_kappa_1.00"] != pytest.approx(metrics["eval/ppl_kappa_0.50"])
    record = json.loads((out / "final" / "twist.json").read_text())
    assert record["rounds"] == 3 and record["kappas"] == [1.0, 0.5]
    assert (out / "final" / "twist_stats.safetensors").exists()  # correction=mean statistics exported


def test_dense_run_under_single_device_backend(tmp_path):
    out = tmp_path / "dense"
    train_on_ranks(1, tiny_args(out, parallel__backend="strict", parallel__engine="local", twist__rounds=2))
    client, run = mlflow_run(out)
    assert run.data.metrics["eval/ppl_kappa_1.00"] < 512  # below uniform over the vocabulary
    assert (out / "final" / "model.safetensors").exists()


def valid_file_of_blocks(count: int, directory: Path, tokenizer_dir: Path, block_size: int) -> Path:
    """Validation text that packs into exactly `count` blocks."""
    tok = load_tokenizer(tokenizer_dir, "hello")
    words = BROWN_VALID.read_text().split()[:4000]

    def blocks(n: int) -> int:
        path = directory / f"valid-{n}.txt"
        path.write_text(" ".join(words[:n]) + "\n")
        return len(packed_blocks([str(path)], tok, tokenizer_dir, block_size, directory / "probe"))

    lo, hi = 1, len(words)  # the fewest words that pack into `count` blocks (the count grows with the prefix)
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (mid + 1, hi) if blocks(mid) < count else (lo, mid)
    assert blocks(lo) == count, blocks(lo)
    return directory / f"valid-{lo}.txt"


def test_sharded_evaluation_finishes_when_the_ranks_rows_differ(tmp_path):
    """15 validation blocks over 2 ranks of one FSDP2 group are 8 and 7 rows: with micro-batch 4, two
    batches against one, and the rank with two would wait in a forward's all-gather for a peer that has
    finished. Every rank gets the same batch count (`batches.eval_batches`), so evaluation ends."""
    tokenizer_dir = tmp_path / "tokenizer"
    train_tokenizer([str(SHAKESPEARE)], tokenizer_dir, vocab_size=512)
    valid = valid_file_of_blocks(15, tmp_path, tokenizer_dir, block_size=64)
    out = tmp_path / "run"
    overrides = dict(parallel__engine="fsdp", eval__max_batches=10, parallel__timeout_s=60)
    train_on_ranks(
        2,
        tiny_args(out, data__tokenizer=tokenizer_dir, twist__rounds=1, **overrides)
        + ["--data.valid_files", str(valid)],
        timeout=240,  # a rank stuck in the all-gather would wait out the 60 s collective timeout and fail
    )
    client, run = mlflow_run(out)
    assert run.data.metrics["eval/ppl_kappa_1.00"] < 512
