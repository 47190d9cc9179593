"""Stand-ins for the files one rank of bench/at_scale.py reads: the pretrained checkpoint and the old ranks'
central pieces, zeros made when read, with what was read counted.

Kept out of bench/at_scale.py so that module holds the measurements; these touch no file and need no process group.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import torch


class StubCheckpoint:
    """A safetensors handle of a bf16 checkpoint whose every tensor is zeros; counts the bytes read."""

    def __init__(self, shapes: Mapping[str, torch.Size]) -> None:
        self.shapes, self.bytes_read = shapes, 0

    def get_slice(self, name: str):  # noqa: ANN201 - a safetensors slice
        stub, shape = self, self.shapes[name]

        class Slice:
            def get_shape(self) -> list[int]:
                return list(shape)

            def __getitem__(self, rows: slice) -> torch.Tensor:
                values = torch.zeros((len(range(*rows.indices(shape[0]))), *shape[1:]), dtype=torch.bfloat16)
                stub.bytes_read += values.numel() * 2
                return values

        return Slice()

    def get_tensor(self, name: str) -> torch.Tensor:
        self.bytes_read += self.shapes[name].numel() * 2
        return torch.zeros(self.shapes[name], dtype=torch.bfloat16)


class StubPieces(Mapping):
    """The central pieces an old rank saved: zeros of the old piece length, made when read."""

    def __init__(self, shapes: Mapping[str, torch.Size], old_world: int) -> None:
        self.shapes, self.old_world = shapes, old_world

    def __getitem__(self, name: str) -> torch.Tensor:
        return torch.zeros(-(-self.shapes[name].numel() // self.old_world))

    def __iter__(self) -> Iterator[str]:
        return iter(self.shapes)

    def __len__(self) -> int:
        return len(self.shapes)


class OldRanks:
    """Every old rank's pieces, recording which ranks were read (as `checkpoint.OldRankStates` opens files)."""

    def __init__(self, shapes: Mapping[str, torch.Size], old_world: int) -> None:
        self.pieces, self.old_world, self.opened = StubPieces(shapes, old_world), old_world, {0}

    def __len__(self) -> int:
        return self.old_world

    def __getitem__(self, rank: int) -> StubPieces:
        self.opened.add(rank)
        return self.pieces
