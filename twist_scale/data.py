"""Tokenizer, corpus loading, packing, caching and deterministic (group, rank) sharding."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from transformers import AutoTokenizer, LlamaTokenizer, PreTrainedTokenizerBase

from twist_scale.atomic import atomic_file
from twist_scale.config import DataConfig, RunConfig
from twist_scale.startup import local_directory
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
    Path(f"{tmp_prefix}.model").replace(directory / SPM_FILE)  # atomic: readers never see half a model
    Path(f"{tmp_prefix}.vocab").unlink(missing_ok=True)


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


def prepare_tokenizer(cfg: DataConfig, directory: Path, train: bool) -> Path:
    """The tokenizer directory; trains one there when `train` (rank 0 only) and none exists."""
    if train and not has_tokenizer(directory):  # never into a checkpoint's directory: it has one
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


def _load_texts(files: list[str], hub_dataset: str, text_field: str, split: str = "train") -> list[str]:
    import datasets

    column = text_field
    if hub_dataset and not files:
        ds = datasets.load_dataset(hub_dataset, split=split)
    else:
        suffix = Path(files[0]).suffix
        builder = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}.get(suffix)
        if builder is None:
            raise ValueError(f"{files[0]}: unsupported data file type {suffix!r}; use .txt, .jsonl or .parquet")
        ds = datasets.load_dataset(builder, data_files=files, split="train")
        column = "text" if builder == "text" else text_field
    if column not in ds.column_names:
        raise ValueError(f"no column {text_field!r} in {files or hub_dataset}; set --data.text_field")
    return [t for t in ds[column] if t and t.strip()]


def _cache_key(files: list[str], hub: str, tokenizer_dir: Path, block_size: int) -> str:
    h = hashlib.sha256()
    for f in files:
        st = Path(f).stat()
        h.update(f"{Path(f).resolve()}:{st.st_size}:{st.st_mtime_ns}".encode())
    h.update(hub.encode())
    for name in sorted(p.name for p in tokenizer_dir.iterdir() if p.is_file()):
        h.update((tokenizer_dir / name).read_bytes())
    h.update(str(block_size).encode())
    return h.hexdigest()[:20]


def _joined_ids(texts: list[str], tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Every document's ids followed by EOS, in order: the one stream both training and evaluation cut."""
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for start in range(0, len(texts), 2000):
        for doc in tokenizer(texts[start : start + 2000], add_special_tokens=False)["input_ids"]:
            ids.extend(doc)
            ids.append(eos)
    return ids


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
    return torch.tensor(_joined_ids(_load_texts(files, "", text_field), tokenizer), dtype=torch.long)


def packed_blocks(
    files: list[str],
    tokenizer: PreTrainedTokenizerBase,
    tokenizer_dir: Path,
    block_size: int,
    cache_dir: Path,
    hub_dataset: str = "",
    text_field: str = "text",
    split: str = "train",
) -> np.ndarray:
    """(N, block_size) int32 token blocks: documents joined by EOS, cut into fixed blocks, cached."""
    cache = cache_dir / f"blocks-{_cache_key(files, hub_dataset, tokenizer_dir, block_size)}.npy"
    if cache.exists():
        return np.load(cache, mmap_mode="r")
    ids = _joined_ids(_load_texts(files, hub_dataset, text_field, split), tokenizer)
    n = len(ids) // block_size
    if n == 0:
        raise ValueError(f"{files or hub_dataset}: {len(ids)} tokens is less than one block of {block_size}")
    blocks = np.asarray(ids[: n * block_size], dtype=np.int32).reshape(n, block_size)
    with atomic_file(cache) as fh:
        np.save(fh, blocks)
    return blocks


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
        self.epoch, self.batch = 0, 0

    @property
    def batches_per_epoch(self) -> int:
        return len(self.rows) // self.batch_size

    def _order(self) -> np.ndarray:
        return np.random.default_rng([self.seed, self.epoch]).permutation(self.rows)

    def __iter__(self) -> Iterator[torch.Tensor]:
        return self

    def __next__(self) -> torch.Tensor:
        if self.batch >= self.batches_per_epoch:
            self.epoch, self.batch = self.epoch + 1, 0
        rows = self._order()[self.batch * self.batch_size : (self.batch + 1) * self.batch_size]
        self.batch += 1
        return torch.from_numpy(np.asarray(self.blocks[np.sort(rows)], dtype=np.int64))

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


def load_run_data(run: RunConfig, topo: Topology, barrier: Callable[[], None]) -> RunData:
    """Rank 0 trains the tokenizer and tokenizes each split first; the others then read its cache.

    Every rank trains on its own shard; a group's ranks split the validation set between them.
    """
    cfg, out_dir, is_main = run.data, Path(run.out_dir), topo.rank == 0
    tokenizer_dir = prepare_tokenizer(cfg, tokenizer_directory(run), train=is_main)
    barrier()
    tokenizer = load_tokenizer(tokenizer_dir, sample_text(cfg))
    cache = Path(cfg.cache_dir) if cfg.cache_dir else out_dir / "cache"

    def blocks(files: list[str], split: str) -> np.ndarray:
        def load() -> np.ndarray:
            return packed_blocks(
                files, tokenizer, tokenizer_dir, cfg.block_size, cache, cfg.hub_dataset, cfg.text_field, split
            )

        if is_main:
            load()
        barrier()
        return load()

    train = ShardedBatches(blocks(cfg.train_files, "train"), *topo.data_shard, cfg.micro_batch_size, run.seed)
    valid_shard = (topo.dp_rank, topo.ranks_per_group)
    valid = (
        eval_batches(blocks(cfg.valid_files, "validation"), *valid_shard, cfg.micro_batch_size, run.eval.max_batches)
        if cfg.valid_files
        else []
    )
    return RunData(tokenizer, tokenizer_dir, train, valid)
