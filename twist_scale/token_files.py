"""Token files: a corpus tokenised once, by every core, into one flat file of ids that every rank memory-maps.

nanoGPT/Megatron style: `tokens-<key>.bin` holds each non-empty document's ids followed by EOS, in
corpus order, as uint16 (or uint32 for a vocabulary over 65,536), and `tokens-<key>.json` says its
dtype and token and document counts. The index is written last and atomically, so it is also the
marker: whoever sees it sees a complete token file. Ranks that did not prepare the data wait for it
on the (shared) file system (`wait_for`), never in a collective, whose timeout is for hung ranks and
not for an hour of tokenising.

Memory stays bounded by a batch whatever the corpus size: `datasets` writes the documents, and each
map worker its ids, to Arrow files as it goes, and those are copied into the token file one record
batch at a time; no list of all ids is ever built.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from tqdm import tqdm

from twist_scale.atomic import atomic_file, atomic_write_text
from twist_scale.config import MAX_AUTO_PROCS, ConfigError

if TYPE_CHECKING:
    import datasets
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)

FORMAT = 1  # part of the cache key: a change of layout never reads an old file
BUILDERS = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}


def token_dtype(vocab_size: int) -> np.dtype:
    """The narrowest dtype holding every id: uint16 halves the file and the page cache every rank shares."""
    return np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)


def tokenising_procs(num_proc: int) -> int:
    """--data.num_proc, where 0 means one process per core this process may use, at most MAX_AUTO_PROCS."""
    return num_proc or min(len(os.sched_getaffinity(0)), MAX_AUTO_PROCS)


def load_documents(
    files: list[str], hub_dataset: str, text_field: str, split: str, cache_dir: Path | None = None
) -> tuple[datasets.Dataset, str]:
    """The documents (lines of .txt, records of .jsonl/.parquet, or a hub split) and the column holding text.

    An Arrow-backed dataset: `datasets` converts the files in chunks into `cache_dir`, nothing is held in memory.
    """
    import datasets

    column = text_field
    where = str(cache_dir) if cache_dir else None
    if hub_dataset and not files:
        ds = datasets.load_dataset(hub_dataset, split=split)
    else:
        suffix = Path(files[0]).suffix
        builder = BUILDERS.get(suffix)
        if builder is None:
            raise ValueError(f"{files[0]}: unsupported data file type {suffix!r}; use .txt, .jsonl or .parquet")
        ds = datasets.load_dataset(builder, data_files=files, split="train", cache_dir=where)
        column = "text" if builder == "text" else text_field
    if column not in ds.column_names:
        raise ValueError(f"no column {text_field!r} in {files or hub_dataset}; set --data.text_field")
    return ds, column


def encode(texts: list[str | None], tokenizer: PreTrainedTokenizerBase) -> list[list[int]]:
    """Each non-empty document's ids followed by EOS: the one stream both training and evaluation cut."""
    docs = [t for t in texts if t and t.strip()]
    if not docs:
        return []
    eos = tokenizer.eos_token_id
    return [[*ids, eos] for ids in tokenizer(docs, add_special_tokens=False)["input_ids"]]


def _encode_batch(batch: dict[str, list[Any]], tokenizer: PreTrainedTokenizerBase, column: str) -> dict[str, list]:
    return {"ids": encode(batch[column], tokenizer)}


def cache_key(files: list[str], hub_dataset: str, text_field: str, split: str, tokenizer_dir: Path) -> str:
    """What the token file depends on: the files (path, size, mtime), the source's split and column, the tokenizer.

    Not the block size: blocks are a view of the same file.
    """
    h = hashlib.sha256(f"{FORMAT}:{hub_dataset}:{split}:{text_field}".encode())
    for f in files:
        st = Path(f).stat()
        h.update(f"{Path(f).resolve()}:{st.st_size}:{st.st_mtime_ns}".encode())
    for name in sorted(p.name for p in tokenizer_dir.iterdir() if p.is_file()):
        h.update((tokenizer_dir / name).read_bytes())
    return h.hexdigest()[:20]


def index_path(cache_dir: Path, key: str) -> Path:
    return cache_dir / f"tokens-{key}.json"


def prepare_tokens(
    files: list[str],
    tokenizer: PreTrainedTokenizerBase,
    index: Path,
    hub_dataset: str = "",
    text_field: str = "text",
    split: str = "train",
    num_proc: int = 1,
) -> Path:
    """Tokenise the source into `index`'s token file with `num_proc` processes, unless that is done already.

    Scratch files (the documents' and the ids' Arrow files) live beside the cache, in a directory of this
    process's own, and are removed at the end.
    """
    if index.exists():
        return index
    work = index.parent / f".prepare-{index.stem}-{os.getpid()}"
    try:
        docs, column = load_documents(files, hub_dataset, text_field, split, work)
        dtype = token_dtype(len(tokenizer))
        procs = max(1, min(tokenising_procs(num_proc), docs.num_rows))
        ids = docs.map(
            _encode_batch,
            fn_kwargs={"tokenizer": tokenizer, "column": column},
            batched=True,
            remove_columns=docs.column_names,
            features=_ids_features(dtype),
            cache_file_name=str(work / "ids.arrow"),
            new_fingerprint=index.stem,  # never hash the tokenizer: dill is slow on it and the key says it all
            num_proc=procs if procs > 1 else None,
            desc=f"tokenising {split}",
        )
        tokens = _copy_ids([f["filename"] for f in ids.cache_files], index.with_suffix(".bin"), dtype, len(ids))
        meta = {
            "format": FORMAT,
            "dtype": dtype.name,
            "tokens": tokens,
            "documents": len(ids),
            "key": index.stem.removeprefix("tokens-"),
            "source": files or hub_dataset,
            "split": split,
        }
        atomic_write_text(index, json.dumps(meta, indent=1) + "\n")  # last: the marker the other ranks wait for
        log.info("tokenised %s: %d documents, %d tokens (%s) -> %s", split, len(ids), tokens, dtype.name, index)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return index


def _ids_features(dtype: np.dtype) -> datasets.Features:
    import datasets

    return datasets.Features({"ids": datasets.Sequence(datasets.Value(dtype.name))})


def _copy_ids(arrow_files: list[str], target: Path, dtype: np.dtype, documents: int) -> int:
    """Concatenate the map workers' ids into `target`, one record batch in memory at a time; the token count.

    Read as streams, not memory-mapped: a mapped file's pages would count against this process's memory.
    """
    import pyarrow as pa

    tokens = 0
    with atomic_file(target) as out, tqdm(total=documents, unit="doc", desc=f"writing {target.name}") as bar:
        for name in arrow_files:
            with pa.OSFile(name) as source:
                for batch in pa.ipc.open_stream(source):
                    flat = batch.column("ids").flatten().to_numpy(zero_copy_only=False).astype(dtype, copy=False)
                    out.write(np.ascontiguousarray(flat).data)
                    tokens += len(flat)
                    bar.update(batch.num_rows)
    return tokens


def read_index(index: Path) -> dict[str, Any]:
    return json.loads(index.read_text())


def token_blocks(index: Path, block_size: int) -> np.ndarray:
    """(N, block_size) rows of the id stream, memory-mapped; the tail short of a block is dropped."""
    meta = read_index(index)
    n = meta["tokens"] // block_size
    if n == 0:
        raise ValueError(f"{meta['source']}: {meta['tokens']} tokens is less than one block of {block_size}")
    return np.memmap(index.with_suffix(".bin"), dtype=meta["dtype"], mode="r", shape=(n, block_size))


def wait_for(
    ready: Callable[[], bool],
    what: str,
    deadline: float,
    timeout_s: float,
    poll_s: float = 1.0,
    log_s: float = 60.0,
    failed: Callable[[], str | None] = lambda: None,
) -> None:
    """Poll `ready` until it holds, saying so every `log_s`; past `deadline` (time.monotonic) a one-line error.

    `timeout_s` is the --data.prepare_timeout_s the deadline came from, for the message. `failed` says
    why rank 0 gave up preparing, if it did: then the wait ends at once instead of at the deadline.
    """
    next_log = time.monotonic()
    while not ready():
        now = time.monotonic()
        reason = failed()
        if reason is not None:
            raise ConfigError(f"rank 0 failed to prepare the data ({reason}); its log has the details")
        if now >= deadline:
            raise ConfigError(
                f"rank 0 did not finish preparing {what} within --data.prepare_timeout_s {timeout_s:g}; "
                "raise it, check rank 0's log for its error, or run twist-prepare-data with the same flags first"
            )
        if now >= next_log:
            log.warning(
                "waiting for rank 0 to prepare %s (%.0f s left of --data.prepare_timeout_s)", what, deadline - now
            )
            next_log = now + log_s
        time.sleep(min(poll_s, max(0.0, deadline - now)))
