"""The coverage draw: which units each group keeps in one unit block, at native speed.

Every rank draws every group's units every round (holder counts are local knowledge, never sent), so
the draw is O(G · n) per block: at Llama-70B (28,672 neurons, G = 64) that is 1.8 M shuffled positions
per MLP block and 140 M per round, about 40 s in Python. The draw is defined by Python's `random`
(a string-seeded `random.Random` per block, `shuffle`), so checkpoints and the reference algorithm
agree on every subnet; here the same Mersenne Twister words come from numpy's generator in one call,
and the shuffles' rejection sampling and swaps run compiled (numba), word for word as
`random.shuffle` consumes them.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import numba
import numpy as np
import torch

WORD_BITS = 32  # one Mersenne Twister output


def coverage_draw(seed: str, num_units: int, keeps: Sequence[int]) -> torch.Tensor:
    """(G, n) bool: deal shuffled units round-robin over the groups with room, then top each group up to
    its keep from the units it lacks, in a shuffled order; `random.Random(seed)` shuffles.

    Every unit lands somewhere when sum(keeps) >= n. With equal keeps the deal is plain round-robin
    (unit order[i] to group i mod G); unequal keeps (mixed kappa) pass over groups that are full.
    """
    keeps_array = np.asarray(keeps, dtype=np.int64)
    # each shuffled position asks for one word and redraws while the top bits overshoot: about 1.39
    # words per position for long shuffles (2**k / n averages 2 ln 2), more for short ones
    words_wanted = int(1.5 * (num_units - 1) * (len(keeps) + 1)) + 256
    while True:
        held = np.zeros((len(keeps), num_units), dtype=np.bool_)
        if _draw(_words(seed, words_wanted), num_units, keeps_array, held) >= 0:
            return torch.from_numpy(held)
        words_wanted *= 2


def kept_ids(held: torch.Tensor) -> list[torch.Tensor]:
    """Each group's held unit ids of a (G, n) draw, ascending: views of one array filled in one compiled pass."""
    mask = held.numpy()
    counts = mask.sum(1)
    ids = np.empty(int(counts.sum()), dtype=np.int64)
    _fill_ids(mask, ids)
    return list(torch.from_numpy(ids).split(counts.tolist()))


@numba.njit(cache=True)
def _fill_ids(mask: np.ndarray, ids: np.ndarray) -> None:
    at = 0
    for g in range(mask.shape[0]):
        for unit in range(mask.shape[1]):  # written always, kept where held: no branch to mispredict
            if at < len(ids):
                ids[at] = unit
            at += mask[g, unit]


def _words(seed: str, count: int) -> np.ndarray:
    """The first `count` outputs of `random.Random(seed)`'s Mersenne Twister, from numpy's implementation of
    the same generator started in the same state."""
    _, (*key, pos), _ = random.Random(seed).getstate()
    generator = np.random.MT19937()
    generator.state = {"bit_generator": "MT19937", "state": {"key": np.asarray(key, dtype=np.uint32), "pos": pos}}
    return generator.random_raw(count).astype(np.uint32)


@numba.njit(cache=True)
def _shuffle(words: np.ndarray, pos: int, x: np.ndarray) -> int:
    """`random.shuffle(x)` on the words from `pos`: the position after the last word used, -1 when they ran out.

    Python's `_randbelow(n)` takes the top bit_length(n) bits of a word, and another word while they are >= n.
    """
    bits = 0  # bit_length(n), kept as n counts down instead of recounted for every position
    while len(x) >> bits:
        bits += 1
    for i in range(len(x) - 1, 0, -1):
        n = i + 1
        if n >> (bits - 1) == 0:
            bits -= 1
        while True:
            if pos >= len(words):
                return -1
            r = np.int64(words[pos]) >> (WORD_BITS - bits)
            pos += 1
            if r < n:
                break
        x[i], x[r] = x[r], x[i]
    return pos


@numba.njit(cache=True)
def _draw(words: np.ndarray, num_units: int, keeps: np.ndarray, held: np.ndarray) -> int:
    """Fill `held` (G, n); the words used, or -1 when `words` ran out (the caller draws more)."""
    groups = len(keeps)
    order = np.arange(num_units)
    pos = _shuffle(words, 0, order)
    if pos < 0:
        return -1
    count = np.zeros(groups, dtype=np.int64)
    turn = 0  # the group dealt to next, unless it is full
    for unit in order:
        full = True
        for _ in range(groups):  # full groups are passed over; with equal keeps none is until all are
            if count[turn] < keeps[turn]:
                full = False
                break
            turn = (turn + 1) % groups
        if full:
            break
        held[turn, unit] = True
        count[turn] += 1
        turn = (turn + 1) % groups
    missing = np.empty(num_units, dtype=np.int64)
    for g in range(groups):
        m = 0
        for unit in order:
            if not held[g, unit]:
                missing[m] = unit
                m += 1
        pos = _shuffle(words, pos, missing[:m])
        if pos < 0:
            return -1
        for unit in missing[: keeps[g] - count[g]]:
            held[g, unit] = True
    return pos
