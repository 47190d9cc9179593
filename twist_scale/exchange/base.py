"""The one interface both exchanges implement, and what they read of the engine's subnet.

An exchange moves values between the groups' engines and the sharded central model, bucket by bucket:
`dispatch` slices every group's subnet out of the central model, `aggregate` averages the groups' subnets
back into it, and `shifts` gives each group what its dropped units add to the residual on average (the
`mean` correction). The synchronisation (`sync.SubnetSync`) drives either one the same way.
"""

from __future__ import annotations

from typing import Protocol

import torch

from twist_scale.exchange.entries import Entry
from twist_scale.models import UnitBlock
from twist_scale.subnet import SubnetSpec


class SubnetSource(Protocol):
    """This rank's view of its group's subnet in the engine, as aggregation reads it."""

    def read(self, entry: Entry) -> torch.Tensor:
        """The whole subnet tensor (collective within the group)."""

    def read_shard(self, entry: Entry) -> tuple[int, torch.Tensor]:
        """Where this rank's stored flat range of the subnet tensor starts, and its values."""

    def stored(self, entry: Entry) -> torch.Tensor:
        """This rank's stored flat range as it is now (no averaging within the group): a copy."""

    def shard_of(self, name: str) -> tuple[int, int]:
        """The flat range of subnet tensor `name` this rank stores and sends."""

    def ranged_state(self, name: str) -> bool:
        """Whether this rank stores only that range of the moments of `name`."""


class Exchange(Protocol):
    sends_changes: bool  # aggregation sends each rank's change since dispatch (a low-precision wire)

    def prepare(self, entries: list[Entry], source: SubnetSource) -> None:
        """Learn, once per run, which range of every tensor each rank stores."""

    def plan(self, entries: list[Entry], bucket_bytes: int) -> list[list[Entry]]:
        """The buckets the entries travel in, the same on every rank."""

    def receives_shard(self, entry: Entry) -> bool:
        """Whether dispatch delivers only this rank's flat range of `entry`, not the whole subnet tensor."""

    def dispatch(self, bucket: list[Entry], specs: list[SubnetSpec]) -> dict[str, torch.Tensor]:
        """This group's subnet tensor of every entry whose last part is in `bucket`, by `Entry.key`."""

    def note_dispatched(self, entries: list[Entry], source: SubnetSource) -> None:
        """Dispatch is complete: keep what a change since dispatch is measured from, if it needs it."""

    def aggregate(self, bucket: list[Entry], source: SubnetSource, specs: list[SubnetSpec]) -> None:
        """Holder mean of the groups' subnet tensors of `bucket` into the central shards."""

    def shifts(
        self, outputs: list[tuple[UnitBlock, Entry]], specs: list[SubnetSpec], means: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """W[:, dropped] @ E[a_dropped] of each unit block's output projection (its entry) for this rank's
        group, by output module, from the central weights as dispatched; `means` by output module."""
