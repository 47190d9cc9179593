"""Write-aside-then-rename: a reader sees the old file or directory or the complete new one, never half.

Files go to a temporary sibling (same file system, so the rename is atomic), are flushed to disk and
renamed over the target. A directory is filled under a hidden sibling name and renamed into place;
whatever stood at the target is removed just before.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO


@contextmanager
def atomic_file(path: Path) -> Iterator[BinaryIO]:
    """A binary file to write `path` through; it replaces `path` on success and is removed on error.

    The temporary name is unique to the process, so processes writing the same target do not mix bytes.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: Path, data: bytes) -> None:
    with atomic_file(path) as fh:
        fh.write(data)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def temp_sibling(final: Path) -> Path:
    """The hidden directory `atomic_directory(final)` fills: known to every process that writes into it."""
    return final.with_name(f".tmp-{final.name}")


@contextmanager
def atomic_directory(final: Path) -> Iterator[Path]:
    """A fresh empty directory to fill; on success it replaces `final`, on error it is removed."""
    final = Path(final)
    tmp = temp_sibling(final)
    shutil.rmtree(tmp, ignore_errors=True)  # left by a crash
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
