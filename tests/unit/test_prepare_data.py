"""Token files: exact round trip, today's packing, the same bytes from any process count, and the wait."""

from __future__ import annotations

import datetime
import json
import os
import time

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import BROWN_VALID, SHAKESPEARE, tiny_args
from helpers.dist import run_on_ranks

from twist_scale import token_files
from twist_scale.commands import prepare_data as prepare_command
from twist_scale.config import ConfigError
from twist_scale.data import packed_blocks, token_stream
from twist_scale.token_files import cache_key, index_path, prepare_tokens, read_index, token_dtype, wait_for
from twist_scale.tokenizer import load_tokenizer, train_tokenizer

COLLECTIVE_TIMEOUT_S = 5
PREPARATION_S = 8  # rank 0's preparation outlasts the collective timeout


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tok")
    train_tokenizer([str(SHAKESPEARE)], directory, vocab_size=384)
    return directory


@pytest.fixture(scope="module")
def tok(tokenizer_dir):
    return load_tokenizer(tokenizer_dir, "hello")


def token_file(files, tok, tokenizer_dir, cache, text_field="text", num_proc=1):
    index = index_path(cache, cache_key(files, "", text_field, "train", tokenizer_dir))
    prepare_tokens(files, tok, index, text_field=text_field, num_proc=num_proc)
    meta = read_index(index)
    return np.fromfile(index.with_suffix(".bin"), dtype=meta["dtype"]), meta


def documents():
    """Real lines, blank and whitespace-only lines (skipped, as training always skipped them) and odd characters."""
    lines = BROWN_VALID.read_text().splitlines()[:300]
    return [*lines[:100], "", "   ", "naïve café — “quoted” ✓", *lines[100:]]


def test_token_file_round_trips_the_documents(tok, tokenizer_dir, tmp_path):
    text = tmp_path / "docs.txt"
    text.write_text("\n".join(documents()) + "\n")
    ids, meta = token_file([str(text)], tok, tokenizer_dir, tmp_path / "cache")
    kept = [d for d in documents() if d.strip()]
    assert meta["dtype"] == "uint16" and ids.dtype == np.uint16  # 384 ids fit in 16 bits
    assert meta["documents"] == len(kept) and meta["tokens"] == len(ids)
    ends = np.flatnonzero(ids == tok.eos_token_id)
    assert len(ends) == len(kept)
    pieces = np.split(ids, ends + 1)[:-1]
    assert [tok.decode(p[:-1].tolist()) for p in pieces] == kept
    np.testing.assert_array_equal(ids, token_stream([str(text)], tok).numpy())  # evaluation's stream, exactly


def test_jsonl_and_parquet_give_the_text_files_tokens(tok, tokenizer_dir, tmp_path):
    docs = [*documents(), None]  # a record without text is skipped like a blank line
    text = tmp_path / "docs.txt"
    text.write_text("\n".join(d for d in docs if d is not None) + "\n")
    records = tmp_path / "docs.jsonl"
    records.write_text("".join(json.dumps({"body": d, "id": i}) + "\n" for i, d in enumerate(docs)))
    table = tmp_path / "docs.parquet"
    pq.write_table(pa.table({"body": docs}), table)
    expected, _ = token_file([str(text)], tok, tokenizer_dir, tmp_path / "cache")
    for source in (records, table):
        ids, _ = token_file([str(source)], tok, tokenizer_dir, tmp_path / "cache", text_field="body")
        np.testing.assert_array_equal(ids, expected)


def test_dtype_follows_the_vocabulary(tok, tokenizer_dir, tmp_path, monkeypatch):
    assert token_dtype(384) == np.uint16 and token_dtype(65536) == np.uint16  # ids up to 65535
    assert token_dtype(65537) == np.uint32 and token_dtype(151_936) == np.uint32
    text = tmp_path / "docs.txt"
    text.write_text("\n".join(documents()))
    narrow, _ = token_file([str(text)], tok, tokenizer_dir, tmp_path / "narrow")
    monkeypatch.setattr(token_files, "token_dtype", lambda vocab: token_dtype(vocab + 2**16))  # a large vocabulary
    wide, meta = token_file([str(text)], tok, tokenizer_dir, tmp_path / "wide")
    assert meta["dtype"] == "uint32" and wide.dtype == np.uint32
    np.testing.assert_array_equal(wide, narrow)


def test_blocks_equal_the_packing_of_before(tok, tokenizer_dir, tmp_path):
    """The algorithm training used before token files, inline: every id in a Python list, cut, int32."""
    ds = datasets.load_dataset("text", data_files=[str(SHAKESPEARE)], split="train", cache_dir=str(tmp_path / "hf"))
    texts = [t for t in ds["text"] if t and t.strip()]
    ids: list[int] = []
    for start in range(0, len(texts), 2000):
        for doc in tok(texts[start : start + 2000], add_special_tokens=False)["input_ids"]:
            ids.extend(doc)
            ids.append(tok.eos_token_id)
    n = len(ids) // 64
    before = np.asarray(ids[: n * 64], dtype=np.int32).reshape(n, 64)
    blocks = packed_blocks([str(SHAKESPEARE)], tok, tokenizer_dir, 64, tmp_path / "cache")
    assert blocks.shape == before.shape and isinstance(blocks, np.memmap)
    np.testing.assert_array_equal(blocks, before)


def test_one_and_two_processes_write_the_same_files(tok, tokenizer_dir, tmp_path, capfd):
    one, meta_one = token_file([str(SHAKESPEARE)], tok, tokenizer_dir, tmp_path / "one", num_proc=1)
    two, meta_two = token_file([str(SHAKESPEARE)], tok, tokenizer_dir, tmp_path / "two", num_proc=2)
    assert one.tobytes() == two.tobytes() and meta_one == meta_two
    progress = capfd.readouterr().err
    assert "tokenising train (num_proc=2)" in progress and "examples/s" in progress  # the bar, with throughput
    assert not list(tmp_path.glob("*/.prepare-*"))  # the Arrow scratch is gone


def test_prepare_command_writes_what_training_reads(tmp_path, capsys):
    args = tiny_args(tmp_path / "run", data__cache_dir=tmp_path / "cache", data__num_proc=1)
    prepare_command.main(args)
    printed = capsys.readouterr().out
    indexes = sorted((tmp_path / "cache").glob("tokens-*.json"))
    assert len(indexes) == 2 and all(str(i) in printed for i in indexes), printed
    assert "train: " in printed and "validation: " in printed
    stamps = [i.stat().st_mtime_ns for i in indexes]
    prepare_command.main(args)  # prepared once: a second call finds the files
    assert [i.stat().st_mtime_ns for i in indexes] == stamps
    prepare_command.main(["--help"])
    usage = capsys.readouterr().out
    assert "usage: twist-prepare-data" in usage and "--data.num_proc" in usage and "--data.prepare_timeout_s" in usage


def test_unusable_data_is_one_line(tmp_path):
    table = tmp_path / "docs.csv"
    table.write_text("text\nhello\n")
    records = tmp_path / "docs.jsonl"
    records.write_text('{"body": "hello"}\n')
    for data, message in ((table, "unsupported data file type '.csv'; use .txt, .jsonl or .parquet"),
                          (records, "no column 'text' in ")):  # fmt: skip
        args = tiny_args(tmp_path / "run", data__cache_dir=tmp_path / "cache", data__valid_files=data)
        with pytest.raises(SystemExit) as exit_:
            prepare_command.main(args)
        assert message in str(exit_.value) and "\n" not in str(exit_.value)


def test_a_wait_past_its_deadline_is_one_line():
    start = time.monotonic()
    with pytest.raises(ConfigError) as err:
        wait_for(lambda: False, "the token file X", start + 0.3, 0.3, poll_s=0.05)
    assert 0.3 <= time.monotonic() - start < 2
    message = str(err.value)
    assert "\n" not in message and "--data.prepare_timeout_s 0.3" in message and "twist-prepare-data" in message


def _load_while_rank_0_prepares_slowly(rank: int, world: int, argv: list[str]) -> None:
    """One rank of a run whose data takes longer to prepare than any collective may wait."""
    import torch.distributed as dist

    from twist_scale import data
    from twist_scale.config_load import load_config
    from twist_scale.topology import Topology

    port = os.environ["MASTER_PORT"]
    timeout = datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world, timeout=timeout)
    if rank == 0:
        prepare = data.prepare_data
        data.prepare_data = lambda run: time.sleep(PREPARATION_S) or prepare(run)
    loaded = data.load_run_data(load_config(argv), Topology(world, rank, 1))
    dist.barrier()  # the group outlived the wait, and every rank got here
    assert len(loaded.train.rows) and loaded.valid


@pytest.mark.slow  # two ranks and an 8 s preparation
def test_ranks_wait_for_a_preparation_longer_than_the_collective_timeout(tmp_path):
    args = tiny_args(tmp_path / "run", data__cache_dir=tmp_path / "cache", data__num_proc=1)
    args += ["--parallel.timeout_s", str(COLLECTIVE_TIMEOUT_S), "--parallel.engine", "local", "--twist.groups", "2"]
    start = time.monotonic()
    ranks = run_on_ranks(_load_while_rank_0_prepares_slowly, 2, args, group=False, timeout=120)
    assert time.monotonic() - start > PREPARATION_S
    assert "waiting for rank 0 to prepare the token file" in ranks.output


def _load_while_rank_0_fails(rank: int, world: int, argv: list[str]) -> None:
    """One rank of a run whose rank 0 fails to prepare the data."""
    import torch.distributed as dist

    from twist_scale import data
    from twist_scale.config_load import load_config
    from twist_scale.topology import Topology

    port = os.environ["MASTER_PORT"]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    if rank == 0:

        def fails(run):  # noqa: ANN001, ANN202
            time.sleep(1)  # rank 1 is waiting by now
            raise OSError("No space left on device")

        data.prepare_data = fails
    try:
        data.load_run_data(load_config(argv), Topology(world, rank, 1))
    finally:
        if rank == 0:
            time.sleep(3)  # rank 0 hosts the launch's store: kept up until rank 1 read the reason


@pytest.mark.slow  # two ranks
def test_ranks_waiting_for_a_failed_preparation_stop_at_once_with_its_reason(tmp_path):
    args = tiny_args(tmp_path / "run", data__cache_dir=tmp_path / "cache", data__prepare_timeout_s=600)
    args += ["--parallel.engine", "local", "--twist.groups", "2"]
    start = time.monotonic()
    ranks = run_on_ranks(_load_while_rank_0_fails, 2, args, group=False, timeout=120, may_fail=True)
    assert time.monotonic() - start < 60  # not the 600 s of --data.prepare_timeout_s
    assert "No space left on device" in ranks.failures[0]
    reason = ranks.failures[1].strip().splitlines()[-1]
    assert "rank 0 failed to prepare the data (OSError: No space left on device)" in reason, reason
