"""What the exchanges move: entries (a parameter, a statistic or one optimizer moment of a parameter),
and the buckets they travel in.

Tensors travel in buckets of about `bucket_bytes` per rank, one collective per bucket: a latency-bound
phase becomes a bandwidth-bound one, and the exchange's temporaries are bounded by the bucket, not by
the largest tensor.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from itertools import groupby

import torch

from twist_scale.models import AxisSlice, UnitBlock


@dataclass(frozen=True)
class Entry:
    """One central tensor as the exchange sees it."""

    name: str  # the parameter or statistic
    shape: torch.Size
    unit: tuple[UnitBlock, AxisSlice] | None  # None: every group holds it whole
    moment: str = ""  # an optimizer moment of the parameter ('exp_avg'); empty: its value
    whole: bool = False  # every rank receives it full-width in dispatch (the statistics a correction reads)
    part: tuple[int, int] | None = None  # [a, b) of every owner's piece; None: the whole piece

    @property
    def key(self) -> str:
        """Its name in the central model's shards and checkpoints: 'name' or 'name@moment'."""
        return f"{self.name}@{self.moment}" if self.moment else self.name

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def alike(bucket: list[Entry]) -> Iterator[list[int]]:
    """Runs of consecutive entries with the same holders over the same range: a weight and its moments.

    They share one set of held positions and (in aggregation) one holder count.
    """

    def key(i: int) -> tuple:
        return bucket[i].name, bucket[i].part

    for _, run in groupby(range(len(bucket)), key):
        yield list(run)


ALONE = 4  # an entry of at least 1/ALONE of a bucket travels alone: its runs need no gathering


def buckets(entries: list[Entry], bucket_bytes: int, elements: Callable[[Entry], float]) -> list[list[Entry]]:
    """Consecutive entries whose fp32 size (`elements` of each) adds up to about `bucket_bytes`; an entry of
    a quarter of a bucket or more gets a bucket of its own, where what arrives from the ranks is exactly
    the tensor's runs in order (`runs.take` copies nothing)."""
    out: list[list[Entry]] = [[]]
    size = 0.0
    for entry in entries:
        alone = ALONE * 4 * elements(entry) >= bucket_bytes
        if out[-1] and (alone or size + 4 * elements(entry) > bucket_bytes):
            out.append([])
            size = 0.0
        out[-1].append(entry)
        size += bucket_bytes if alone else 4 * elements(entry)
    return [b for b in out if b]


def plan_buckets(
    entries: list[Entry], bucket_bytes: int, piece_len: Callable[[str], int], per_rank: Callable[[Entry], int]
) -> list[list[Entry]]:
    """Buckets of about `bucket_bytes` on the wire per rank (`per_rank(entry)`: the most elements of an
    entry any rank sends or receives); an entry larger than a bucket is cut into parts, each the same
    sub-range of every owner's piece (`piece_len(key)` elements), so a group's elements in it are still
    one run per owner."""
    parts = []
    for entry in entries:
        k, cuts = piece_len(entry.key), math.ceil(4 * per_rank(entry) / bucket_bytes)
        if cuts <= 1 or k <= 1:
            parts.append(entry)
            continue
        step = -(-k // min(cuts, k))
        parts += [replace(entry, part=(a, min(a + step, k))) for a in range(0, k, step)]

    def elements(entry: Entry) -> float:
        k = piece_len(entry.key)
        share = 1.0 if entry.part is None else (entry.part[1] - entry.part[0]) / k
        return per_rank(entry) * share

    return buckets(parts, bucket_bytes, elements)
