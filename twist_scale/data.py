"""A run's prepared data (token files, `token_files.py`): rank 0 makes it, the other ranks wait for its
files, and every rank loads its shard; held-out text for evaluation is packed the same way."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from transformers import PreTrainedTokenizerBase

from twist_scale.batches import ShardedBatches, eval_batches
from twist_scale.config import DataConfig, RunConfig
from twist_scale.distill import StoredTeacher
from twist_scale.token_files import (
    cache_key,
    encode,
    index_path,
    load_documents,
    prepare_tokens,
    token_blocks,
    wait_for,
)
from twist_scale.tokenizer import has_tokenizer, load_tokenizer, prepare_tokenizer, sample_text, tokenizer_directory
from twist_scale.topology import Topology


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
