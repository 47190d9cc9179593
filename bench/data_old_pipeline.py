"""The data pipeline before token files (twist_scale/data.py until issue 31): every id in a Python list.

Kept as bench/data.py's reference, apart from its cells: that script measures it against the token files
(`twist_scale.data.packed_blocks`); nothing else uses it.
"""

from __future__ import annotations

from pathlib import Path


def load_texts(files: list[str], cache_dir: str) -> list[str]:
    import datasets

    ds = datasets.load_dataset("text", data_files=files, split="train", cache_dir=cache_dir)
    return [t for t in ds["text"] if t and t.strip()]


def joined_ids(texts: list[str], tokenizer) -> list[int]:
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for start in range(0, len(texts), 2000):
        for doc in tokenizer(texts[start : start + 2000], add_special_tokens=False)["input_ids"]:
            ids.extend(doc)
            ids.append(eos)
    return ids


def packed_blocks(files: list[str], tokenizer, block_size: int, cache: Path):
    import numpy as np

    from twist_scale.atomic import atomic_file

    ids = joined_ids(load_texts(files, str(cache / "hf")), tokenizer)
    n = len(ids) // block_size
    blocks = np.asarray(ids[: n * block_size], dtype=np.int32).reshape(n, block_size)
    with atomic_file(cache / "blocks.npy") as fh:
        np.save(fh, blocks)
    return blocks
