"""Flat-range arithmetic shared by every collective of the packed exchange.

A bucket's all-to-all sends and receives runs of flat tensors; cutting and gluing them with one tensor
expression, not a loop per rank, group or element, keeps the exchange's cost per bucket, not per element.
"""

from __future__ import annotations

import torch


def exclusive_cumsum(lengths: torch.Tensor) -> torch.Tensor:
    """Where each of `lengths` (any shape, row-major) starts in their concatenation."""
    flat = lengths.flatten()
    return (torch.cumsum(flat, 0) - flat).view(lengths.shape)


def expand_ranges(starts: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """The concatenation of arange(start, start + length) over the pairs, in one tensor expression:
    ones, with each range's first step jumping to its start, summed up."""
    lengths, starts = lengths.flatten(), starts.flatten()
    keep = lengths > 0
    lengths, starts = lengths[keep], starts[keep]
    total = int(lengths.sum())
    if total == 0:
        return torch.empty(0, dtype=torch.long)
    steps = torch.ones(total, dtype=torch.long)
    ends = starts + lengths - 1  # the last index of each range
    steps[exclusive_cumsum(lengths)] = starts - torch.cat([torch.tensor([0]), ends[:-1]])
    return torch.cumsum(steps, 0)


SLICE_AT = 256  # ranges this long on average are copied slice by slice: cheaper than an index per element


def take(source: torch.Tensor, starts: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """`source` at the concatenated ranges; `source` itself (no copy) where they are all of it, in order,
    as they are when a bucket holds one tensor. Long ranges (a small world, large tensors) are copied
    slice by slice; many short ones through one index of every element."""
    lengths, starts = lengths.flatten(), starts.flatten()
    keep = lengths > 0
    lengths, starts = lengths[keep], starts[keep]
    if torch.equal(starts, exclusive_cumsum(lengths)) and int(lengths.sum()) == len(source):
        return source
    if len(lengths) * SLICE_AT <= int(lengths.sum()):
        pieces = [source[a : a + n] for a, n in zip(starts.tolist(), lengths.tolist(), strict=True)]
        return torch.cat(pieces) if pieces else source[:0]
    return source.index_select(0, expand_ranges(starts, lengths).to(source.device))


def gather_runs(sources: list[torch.Tensor], starts: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """One payload, rank after rank, of the runs [starts[r, i], + lengths[r, i]) of each `sources[i]`:
    `sources[0]` itself when it is all of one source in order, its slices when the runs are long, else
    one index over the sources' concatenation."""
    if len(sources) == 1:
        return take(sources[0], starts, lengths)
    flat_lengths = lengths.flatten()
    if len(flat_lengths) * SLICE_AT <= int(flat_lengths.sum()):
        rows = (flat_lengths > 0).nonzero(as_tuple=True)[0]
        cols = rows % lengths.shape[1]
        runs = zip(cols.tolist(), starts.flatten()[rows].tolist(), flat_lengths[rows].tolist(), strict=True)
        return torch.cat([sources[i][a : a + n] for i, a, n in runs])
    offsets = torch.tensor([0] + [len(t) for t in sources[:-1]]).cumsum(0)
    return take(torch.cat(sources), starts + offsets, lengths)


def by_entry(received: torch.Tensor, recv_lens: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
    """What an all-to-all delivered source after source, reordered entry after entry in one copy (a view
    where a bucket holds one entry), and where each entry's chunks (sources 0, 1, ... in order) start
    and end: (E + 1,) offsets."""
    recv_at = exclusive_cumsum(recv_lens)  # (W, E): where each (source, entry) chunk starts in `received`
    entry_at = torch.cat([torch.zeros(1, dtype=torch.long), recv_lens.sum(0).cumsum(0)]).tolist()
    return take(received, recv_at.T, recv_lens.T), entry_at
