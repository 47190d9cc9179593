"""What the synchronisation sees of an engine: its (sub-)model's tensors by name, whole or by range.

Dispatch writes a group's subnet into its engine and aggregation reads it back; neither trains. The
ranges say which flat piece of each tensor a rank stores itself (its shard), so that aggregation sends
each element once and dispatch sends a rank only what it stores.
"""

from __future__ import annotations

import abc

import torch
from torch import nn


class EngineStorage(abc.ABC):
    """Reads and writes an engine's full (group-gathered) tensors and this rank's shard of them by name."""

    module: nn.Module
    params: dict[str, nn.Parameter]  # the (sub-)model's parameters by name, as read/write address them

    def local_tensors(self) -> list[torch.Tensor]:
        """The weights this rank stores (its shard where the engine shards them): a local check reads them."""
        return [p.detach() for p in self.module.parameters()]

    def submodule(self, name: str) -> nn.Module:
        """A module of the trained (sub-)model: where a correction sets its factor or shift."""
        return self.module.get_submodule(name)

    def read_buffer(self, name: str) -> torch.Tensor:
        """Buffers are never sharded: every rank holds its own full copy."""
        return self.module.get_buffer(name).detach()

    @torch.no_grad()
    def write_buffer(self, name: str, value: torch.Tensor) -> None:
        self.module.get_buffer(name).copy_(value)

    @abc.abstractmethod
    def read(self, name: str) -> torch.Tensor:
        """The full fp32 value of parameter `name` (collective within the group)."""

    @abc.abstractmethod
    def write(self, name: str, value: torch.Tensor) -> None:
        """Set parameter `name` everywhere the engine keeps a copy (master and working weights)."""

    @abc.abstractmethod
    def read_state(self, name: str, key: str) -> torch.Tensor:
        """Optimizer moment `key` of parameter `name`, full shape (zeros before the first step)."""

    @abc.abstractmethod
    def write_state(self, name: str, key: str, value: torch.Tensor) -> None: ...

    def shard_range(self, shape: torch.Size, dp_rank: int) -> tuple[int, int] | None:
        """Where the engine shards every parameter (ZeRO-3, FSDP): the flat range of one of `shape`
        that dp rank `dp_rank` of a group stores; None where each rank keeps parameters whole.

        A function of the shape alone, so dispatch can send each rank of any group only its shard.
        """
        return None

    def shard_of(self, name: str) -> tuple[int, int]:
        """The flat range of parameter `name` whose master values (and moments) this rank stores itself.

        The ranges of a group's ranks tile the parameter, so aggregation can read each rank's own range
        and send it, gathering nothing. An engine that keeps whole parameters on every rank splits them
        evenly instead, so each element is still sent once; one that runs alone stores everything.
        """
        return 0, self.params[name].numel()

    def read_shard(self, name: str, key: str = "") -> torch.Tensor:
        """The fp32 values of this rank's shard (`shard_of`; of moment `key`, if not empty), flat: a view
        of the engine's storage where it keeps them in fp32, so aggregation copies nothing it does not send."""
        start, stop = self.shard_of(name)
        return (self.read_state(name, key) if key else self.read(name)).reshape(-1)[start:stop]

    def ranged_state(self, name: str) -> bool:
        """Whether this rank stores only its shard (`shard_of`) of the moments of `name` (ZeRO-1/2's
        partitioned optimizer state, ZeRO-3, FSDP): dispatch then sends it only that range, for `write_shard`."""
        return False

    def write_shard(self, name: str, key: str, flat: torch.Tensor) -> None:
        """Set this rank's shard (`shard_of`) of parameter `name` (of its moment `key`, if not empty): where
        the engine shards parameters (`shard_range`), or, for a moment, where `ranged_state`."""
        raise NotImplementedError(f"{type(self).__name__} keeps whole parameters: use write/write_state")

    @abc.abstractmethod
    def reset_optimizer_state(self) -> None:
        """Fresh moments and step counts, as if the optimizer had just been built."""


def zero_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    for state in optimizer.state.values():
        for key, value in state.items():
            if torch.is_tensor(value):
                value.zero_()
            elif key == "step":
                state[key] = 0
