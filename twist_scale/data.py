"""Tokenizer, a run's prepared data (token files, `token_files.py`) and deterministic (group, rank) sharding."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from transformers import AutoTokenizer, LlamaTokenizer, PreTrainedTokenizerBase

from twist_scale.config import DataConfig, RunConfig
from twist_scale.distill import StoredTeacher, TeacherBatch
from twist_scale.startup import local_directory
from twist_scale.token_files import (
    cache_key,
    encode,
    index_path,
    load_documents,
    prepare_tokens,
    token_blocks,
    wait_for,
)
from twist_scale.topology import Topology

log = logging.getLogger(__name__)

SPM_FILE = "tokenizer.model"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", SPM_FILE)  # any of them: a tokenizer is there


def has_tokenizer(directory: Path) -> bool:
    return any((directory / f).exists() for f in TOKENIZER_FILES)


def train_tokenizer(files: list[str], directory: Path, vocab_size: int) -> None:
    """Byte-fallback BPE with identity normalisation, so decode(encode(text)) == text."""
    import sentencepiece as spm

    directory.mkdir(parents=True, exist_ok=True)
    tmp_prefix = directory / "tokenizer.tmp"
    spm.SentencePieceTrainer.train(
        input=",".join(files),
        model_prefix=str(tmp_prefix),
        vocab_size=vocab_size,
        model_type="bpe",
        byte_fallback=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        input_sentence_size=200_000,
        shuffle_input_sentence=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        num_threads=2,
        minloglevel=2,
    )
    Path(f"{tmp_prefix}.vocab").unlink(missing_ok=True)  # first: waiting ranks hash the dir once the model is in
    Path(f"{tmp_prefix}.model").replace(directory / SPM_FILE)  # atomic: readers never see half a model


def load_tokenizer(directory: Path, sample_text: str) -> PreTrainedTokenizerBase:
    """Load a tokenizer directory; a bare tokenizer.model goes through LlamaTokenizer.

    AutoTokenizer on a directory holding only the .model file gives different ids.
    """
    if (directory / "tokenizer.json").exists() or (directory / "tokenizer_config.json").exists():
        tok = AutoTokenizer.from_pretrained(directory)
    elif (directory / SPM_FILE).exists():
        tok = LlamaTokenizer.from_pretrained(directory, add_bos_token=False)
    else:
        raise FileNotFoundError(f"no tokenizer in {directory}: expected {SPM_FILE} or tokenizer.json")
    ids = tok(sample_text, add_special_tokens=False)["input_ids"]
    if not ids or tok.decode(ids) != sample_text:
        raise RuntimeError(
            f"tokenizer in {directory} fails an encode/decode round trip on the training text "
            f"({len(ids)} ids); it would train on garbage. Retrain it (delete {directory}) or fix it."
        )
    return tok


def pretrained_tokenizer(pretrained: str) -> Path | None:
    """The tokenizer a pretrained checkpoint (directory or hub id) ships with, if it has one."""
    directory = local_directory(pretrained, ["tokenizer*", SPM_FILE, "special_tokens_map.json"])
    return directory if has_tokenizer(directory) else None


def tokenizer_directory(run: RunConfig) -> Path:
    """--data.tokenizer, else the pretrained checkpoint's own tokenizer, else `<out_dir>/tokenizer` (trained)."""
    if run.data.tokenizer:
        return Path(run.data.tokenizer)
    own = pretrained_tokenizer(run.model.pretrained) if run.model.pretrained else None
    return own or Path(run.out_dir) / "tokenizer"


def prepare_tokenizer(cfg: DataConfig, directory: Path) -> Path:
    """The tokenizer directory; trains one there when none exists (one process: rank 0 or twist-prepare-data)."""
    if not has_tokenizer(directory):  # never into a checkpoint's directory: it has one
        if not cfg.train_files:
            raise ValueError("cannot train a tokenizer without --data.train_files; pass --data.tokenizer DIR")
        log.info("training a %d-token BPE tokenizer on %s", cfg.vocab_size, cfg.train_files)
        train_tokenizer(cfg.train_files, directory, cfg.vocab_size)
    return directory


def sample_text(cfg: DataConfig) -> str:
    """What a tokenizer must round-trip: the first line of the training text."""
    return sample_line(cfg.train_files) if cfg.train_files else "a b"


def sample_line(files: list[str]) -> str:
    with open(files[0], encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                return line.strip()
    raise ValueError(f"{files[0]} holds no text")


def _has_text(path: Path) -> bool:
    with open(path, encoding="utf-8", errors="replace") as fh:
        return any(line.strip() for line in fh)  # stops at the first line with text


def token_stream(files: list[str], tokenizer: PreTrainedTokenizerBase, text_field: str = "text") -> torch.Tensor:
    """The files' non-empty documents (lines of .txt) as one 1-D id stream, each followed by EOS.

    Packed exactly as training packs its blocks, so held-out perplexity sees the same format.
    """
    for f in files:  # `datasets` meets an empty file with a 35-line traceback
        if not Path(f).is_file() or not _has_text(Path(f)):
            raise ValueError(f"test file {f} is missing or holds no text; point --data at a held-out text file")
    docs, column = load_documents(files, "", text_field, "train")
    ids = [i for batch in docs.iter(batch_size=2000) for doc in encode(batch[column], tokenizer) for i in doc]
    return torch.tensor(ids, dtype=torch.long)


def packed_blocks(
    files: list[str],
    tokenizer: PreTrainedTokenizerBase,
    tokenizer_dir: Path,
    block_size: int,
    cache_dir: Path,
    num_proc: int = 1,
) -> np.ndarray:
    """(N, block_size) blocks of text files' documents joined by EOS, memory-mapped from the cache (made if absent)."""
    index = index_path(cache_dir, cache_key(files, "", "text", "train", tokenizer_dir))
    prepare_tokens(files, tokenizer, index, num_proc=num_proc)
    return token_blocks(index, block_size)


class ShardedBatches:
    """Endless shuffled batches from shard `index` of `count` (blocks index, index+count, ...).

    Shards of different ranks are disjoint and together cover every block. The position
    (epoch, batch) is all a resume needs to continue the exact same sequence.
    """

    def __init__(self, blocks: np.ndarray, index: int, count: int, batch_size: int, seed: int) -> None:
        self.rows = np.arange(index, len(blocks), count)
        if len(self.rows) < batch_size:
            raise ValueError(
                f"data shard {index}/{count} has {len(self.rows)} blocks, fewer than one batch of {batch_size}; "
                "use more data, fewer ranks, or a smaller --data.micro_batch_size / --data.block_size"
            )
        self.blocks, self.batch_size, self.seed = blocks, batch_size, seed
        self.teacher: StoredTeacher | None = None  # --twist.distill stored: batches carry its top-k
        self.epoch, self.batch = 0, 0
        self._epoch_order: tuple[int, np.ndarray] | None = None  # (epoch, its order): one shuffle per epoch

    @property
    def batches_per_epoch(self) -> int:
        return len(self.rows) // self.batch_size

    def _order(self) -> np.ndarray:
        """The epoch's order, a function of (seed, epoch) alone: O(shard), so computed once per epoch."""
        return np.random.default_rng([self.seed, self.epoch]).permutation(self.rows)

    def _epoch_rows(self) -> np.ndarray:
        if self._epoch_order is None or self._epoch_order[0] != self.epoch:
            self._epoch_order = (self.epoch, self._order())
        return self._epoch_order[1]

    def __iter__(self) -> Iterator[torch.Tensor]:
        return self

    def __next__(self) -> torch.Tensor | TeacherBatch:
        if self.batch >= self.batches_per_epoch:
            self.epoch, self.batch = self.epoch + 1, 0
        rows = np.sort(self._epoch_rows()[self.batch * self.batch_size : (self.batch + 1) * self.batch_size])
        self.batch += 1
        input_ids = torch.from_numpy(np.asarray(self.blocks[rows], dtype=np.int64))
        return input_ids if self.teacher is None else self.teacher.batch(rows, input_ids)

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "batch": self.batch}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.batch = int(state["epoch"]), int(state["batch"])

    def load_resharded(self, states: list[dict[str, int]], old_world: int) -> None:
        """Continue at the fraction of an epoch the old world had reached (every rank steps in lockstep).

        The shards differ in another world, so the exact sequence cannot continue; the number of
        epochs seen, and so the data schedule, does.
        """
        old_batches = len(range(0, len(self.blocks), old_world)) // self.batch_size
        seen = int(states[0]["epoch"]) + int(states[0]["batch"]) / max(old_batches, 1)
        self.epoch = int(seen)
        self.batch = min(round((seen - self.epoch) * self.batches_per_epoch), self.batches_per_epoch)


def eval_batches(blocks: np.ndarray, index: int, count: int, batch_size: int, max_batches: int) -> list[torch.Tensor]:
    """A fixed list of validation batches for shard `index` of `count` (no shuffling).

    Every shard gets the same number of batches, as many as the shard with the fewest rows fills: under
    ZeRO-3 and FSDP a forward all-gathers inside the group, so a rank with one batch more than its
    peers would wait for them until the collective timeout.
    """
    rows = np.arange(index, len(blocks), count)
    batches = min(max_batches, len(blocks) // count // batch_size)
    return [
        torch.from_numpy(np.asarray(blocks[rows[i * batch_size : (i + 1) * batch_size]], dtype=np.int64))
        for i in range(batches)
    ]


@dataclass
class RunData:
    """What a rank trains and validates on: its tokenizer, its training shard and its validation batches."""

    tokenizer: PreTrainedTokenizerBase
    tokenizer_dir: Path
    train: ShardedBatches
    valid: list[torch.Tensor]


@dataclass
class PreparedData:
    """A run's tokenizer and the index of each split's token file (`token_files.py`)."""

    tokenizer: PreTrainedTokenizerBase
    tokenizer_dir: Path
    train: Path
    valid: Path | None


def _split_indexes(cfg: DataConfig, cache: Path, tokenizer_dir: Path) -> tuple[Path, Path | None]:
    def index(files: list[str], split: str) -> Path:
        return index_path(cache, cache_key(files, cfg.hub_dataset, cfg.text_field, split, tokenizer_dir))

    return index(cfg.train_files, "train"), index(cfg.valid_files, "validation") if cfg.valid_files else None


def cache_directory(run: RunConfig) -> Path:
    return Path(run.data.cache_dir) if run.data.cache_dir else Path(run.out_dir) / "cache"


def prepare_data(run: RunConfig) -> PreparedData:
    """Train the tokenizer if there is none and tokenise each split not in the cache (twist-prepare-data, rank 0)."""
    cfg = run.data
    tokenizer_dir = prepare_tokenizer(cfg, tokenizer_directory(run))
    tokenizer = load_tokenizer(tokenizer_dir, sample_text(cfg))
    train, valid = _split_indexes(cfg, cache_directory(run), tokenizer_dir)
    prepare_tokens(cfg.train_files, tokenizer, train, cfg.hub_dataset, cfg.text_field, "train", cfg.num_proc)
    if valid is not None:
        prepare_tokens(cfg.valid_files, tokenizer, valid, cfg.hub_dataset, cfg.text_field, "validation", cfg.num_proc)
    return PreparedData(tokenizer, tokenizer_dir, train, valid)


PREPARATION_FAILED = "twist-scale/data-preparation-failed"  # a key in the launch's rendezvous store


def _launch_store() -> dist.Store | None:
    """The rendezvous key-value store of this launch (not a collective: it has no timeout to outlive)."""
    return dist.distributed_c10d._get_default_store() if dist.is_initialized() else None


def prepare_data_or_say_why(run: RunConfig) -> PreparedData:
    """`prepare_data` on rank 0; if it fails, the reason goes to the launch's store first, so the ranks
    waiting for its files stop at once with it instead of at --data.prepare_timeout_s."""
    try:
        return prepare_data(run)
    except Exception as err:
        store = _launch_store()
        if store is not None:
            store.set(PREPARATION_FAILED, f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}")
        raise


def _rank_0_failure() -> str | None:
    """Why rank 0 stopped preparing, if it did: the reason it left in the store, or, where rank 0 itself
    hosted the store (the `deepspeed` launcher's rendezvous), that the store is gone with it."""
    store = _launch_store()
    if store is None:
        return None
    try:
        return store.get(PREPARATION_FAILED).decode() if store.check([PREPARATION_FAILED]) else None
    except dist.DistError as err:
        return f"it exited: the launch's store is unreachable ({str(err).splitlines()[0]})"


def wait_for_data(run: RunConfig, log_s: float = 60.0) -> PreparedData:
    """What `prepare_data` on rank 0 makes, once its files are there: the tokenizer, then each split's index.

    Polls the file system under --data.prepare_timeout_s and takes part in no collective meanwhile, so
    tokenising for longer than --parallel.timeout_s is no hung rank; stops at once if rank 0 says it failed.
    """
    cfg, timeout = run.data, run.data.prepare_timeout_s
    deadline = time.monotonic() + timeout

    def wait(ready: Callable[[], bool], what: str) -> None:
        wait_for(ready, what, deadline, timeout, log_s=log_s, failed=_rank_0_failure)

    tokenizer_dir = tokenizer_directory(run)
    wait(lambda: has_tokenizer(tokenizer_dir), f"the tokenizer in {tokenizer_dir}")
    train, valid = _split_indexes(cfg, cache_directory(run), tokenizer_dir)
    for index in (train, valid):
        if index is not None:
            wait(index.exists, f"the token file {index}")
    return PreparedData(load_tokenizer(tokenizer_dir, sample_text(cfg)), tokenizer_dir, train, valid)


def load_run_data(run: RunConfig, topo: Topology) -> RunData:
    """Rank 0 prepares the data (at once when the cache has it); the others wait for its files, then all map them.

    Every rank trains on its own shard; a group's ranks split the validation set between them.
    """
    cfg = run.data
    data = prepare_data_or_say_why(run) if topo.rank == 0 else wait_for_data(run)
    blocks = token_blocks(data.train, cfg.block_size)
    train = ShardedBatches(blocks, *topo.data_shard, cfg.micro_batch_size, run.seed)
    if run.twist.distill == "stored":
        t = run.twist
        teacher = t.distill_teacher or run.model.pretrained
        where = StoredTeacher.directory_for(
            cache_directory(run), teacher, t.distill_top_k, data.train, cfg.block_size, topo.world_size
        )
        train.teacher = StoredTeacher.prepare(
            where,
            teacher,
            t.distill_top_k,
            blocks,
            *topo.data_shard,
            len(data.tokenizer),
            cfg.micro_batch_size,
            topo.device,
        )
    valid_shard = (topo.dp_rank, topo.ranks_per_group)
    valid = (
        eval_batches(token_blocks(data.valid, cfg.block_size), *valid_shard, cfg.micro_batch_size, run.eval.max_batches)
        if data.valid is not None
        else []
    )
    return RunData(data.tokenizer, data.tokenizer_dir, train, valid)
