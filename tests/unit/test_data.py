"""Tokenizer round trip, packing, caching and disjoint covering shards."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import BROWN_VALID, SHAKESPEARE

from twist_scale.batches import ShardedBatches, eval_batches
from twist_scale.data import packed_blocks, token_stream
from twist_scale.tokenizer import load_tokenizer, sample_line, train_tokenizer


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tok")
    train_tokenizer([str(SHAKESPEARE)], directory, vocab_size=384)
    return directory


def test_tokenizer_round_trips_real_text(tokenizer_dir):
    tok = load_tokenizer(tokenizer_dir, sample_line([str(SHAKESPEARE)]))
    assert len(tok) == 384
    text = BROWN_VALID.read_text()[:3000]  # unseen text, odd punctuation: byte fallback keeps it exact
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) > 100 and tok.decode(ids) == text


def test_broken_tokenizer_is_refused(tmp_path):
    (tmp_path / "tokenizer.model").write_bytes(b"not a sentencepiece model")
    with pytest.raises(Exception):  # noqa: B017 - sentencepiece raises its own parse error
        load_tokenizer(tmp_path, "some text")


def test_packing_and_cache(tokenizer_dir, tmp_path):
    tok = load_tokenizer(tokenizer_dir, "hello")
    blocks = packed_blocks([str(SHAKESPEARE)], tok, tokenizer_dir, 32, tmp_path)
    assert blocks.shape[1] == 32 and blocks.shape[0] > 1000
    assert (np.asarray(blocks) == tok.eos_token_id).sum() > 100  # documents separated by EOS
    cached = list(tmp_path.glob("tokens-*.bin"))
    assert len(cached) == 1
    again = packed_blocks([str(SHAKESPEARE)], tok, tokenizer_dir, 32, tmp_path)
    np.testing.assert_array_equal(again, blocks)
    narrow = packed_blocks([str(SHAKESPEARE)], tok, tokenizer_dir, 16, tmp_path)  # another view of the same file
    assert list(tmp_path.glob("tokens-*.bin")) == cached
    np.testing.assert_array_equal(np.asarray(narrow).reshape(-1)[: blocks.size], np.asarray(blocks).reshape(-1))


@pytest.mark.parametrize("count", [1, 2, 4, 6])
def test_shards_are_disjoint_and_cover(count):
    blocks = np.arange(103 * 4).reshape(103, 4)
    seen = []
    for index in range(count):
        shard = ShardedBatches(blocks, index, count, batch_size=2, seed=0)
        seen.extend(shard.rows.tolist())
        rows_per_epoch = [next(shard)[:, 0].numpy() // 4 for _ in range(shard.batches_per_epoch)]
        assert set(np.concatenate(rows_per_epoch)) <= set(shard.rows)
    assert sorted(seen) == list(range(103))


def test_position_restores_the_same_sequence():
    blocks = np.arange(50 * 4).reshape(50, 4)
    a = ShardedBatches(blocks, 1, 2, batch_size=3, seed=7)
    for _ in range(11):  # crosses an epoch boundary (8 batches per epoch)
        next(a)
    b = ShardedBatches(blocks, 1, 2, batch_size=3, seed=7)
    b.load_state_dict(a.state_dict())
    for _ in range(10):
        assert np.array_equal(next(a).numpy(), next(b).numpy())


def seeded_batches_as_before(blocks, index, count, batch_size, seed, steps):
    """The order ShardedBatches had before it kept each epoch's permutation: (seed, epoch) -> permutation."""
    rows, batches, out = np.arange(index, len(blocks), count), len(range(index, len(blocks), count)) // batch_size, []
    for step in range(steps):
        epoch, batch = divmod(step, batches)
        order = np.random.default_rng([seed, epoch]).permutation(rows)
        out.append(blocks[np.sort(order[batch * batch_size : (batch + 1) * batch_size])])
    return out


def test_batch_sequence_is_unchanged_and_shuffled_once_per_epoch(monkeypatch):
    blocks = np.arange(50 * 4).reshape(50, 4)
    shuffles = []
    order = ShardedBatches._order
    monkeypatch.setattr(ShardedBatches, "_order", lambda self: shuffles.append(self.epoch) or order(self))
    shard = ShardedBatches(blocks, 1, 2, batch_size=3, seed=7)  # 25 rows, 8 batches per epoch
    got = [next(shard).numpy() for _ in range(20)]  # two and a half epochs
    for a, b in zip(got, seeded_batches_as_before(blocks, 1, 2, 3, 7, 20), strict=True):
        np.testing.assert_array_equal(a, b)
    assert shuffles == [0, 1, 2]  # per step: a batch's rows, not a shuffle of the whole shard
    resumed = ShardedBatches(blocks, 1, 2, batch_size=3, seed=7)
    resumed.load_state_dict({"epoch": 1, "batch": 5})
    np.testing.assert_array_equal(next(resumed).numpy(), got[13])


def test_shard_smaller_than_a_batch_is_an_error():
    with pytest.raises(ValueError, match="fewer than one batch"):
        ShardedBatches(np.zeros((5, 4)), 1, 4, batch_size=2, seed=0)


def test_eval_batches_are_fixed_and_sharded():
    blocks = np.arange(40 * 2).reshape(40, 2)
    a = eval_batches(blocks, 0, 2, 4, max_batches=3)
    b = eval_batches(blocks, 1, 2, 4, max_batches=3)
    assert len(a) == 3 and not set(a[0][:, 0].tolist()) & set(b[0][:, 0].tolist())


def test_every_validation_shard_gets_the_same_batch_count():
    """15 blocks over 2 ranks are 8 and 7 rows: one full batch of 4 each, never 2 against 1."""
    blocks = np.arange(15 * 2).reshape(15, 2)
    shards = [eval_batches(blocks, i, 2, 4, max_batches=10) for i in range(2)]
    assert [len(s) for s in shards] == [1, 1]
    assert not set(shards[0][0][:, 0].tolist()) & set(shards[1][0][:, 0].tolist())


def test_an_empty_test_file_is_one_line(tmp_path, tokenizer_dir):
    empty = tmp_path / "test.txt"
    empty.write_text("\n  \n")
    with pytest.raises(ValueError, match=f"test file {empty} is missing or holds no text"):
        token_stream([str(empty)], load_tokenizer(tokenizer_dir, "a b"))
