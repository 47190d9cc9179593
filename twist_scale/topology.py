"""All rank arithmetic for TwIST's 2-D layout (group, dp).

Global rank = group * R + dp_rank, so a group's ranks are neighbours (one node when R fits).
`intra` joins the R ranks of one group (ZeRO shards over it); `cross` joins the G ranks that
share a dp position (aggregation reduce-scatters over it).
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from twist_scale.distributed import comm_device


@dataclass
class Topology:
    world_size: int
    rank: int
    groups: int
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))  # every collective's tensors
    intra_group: object | None = field(default=None, repr=False)
    cross_group: object | None = field(default=None, repr=False)
    model_parallel_group: object | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.groups < 1 or self.world_size % self.groups:
            raise ValueError(
                f"twist.groups={self.groups} does not divide the world size {self.world_size}; "
                f"launch a multiple of {self.groups} processes or change --twist.groups"
            )
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} outside world of size {self.world_size}")

    @property
    def ranks_per_group(self) -> int:
        return self.world_size // self.groups

    @property
    def group(self) -> int:
        return self.rank // self.ranks_per_group

    @property
    def dp_rank(self) -> int:
        return self.rank % self.ranks_per_group

    @property
    def data_shard(self) -> tuple[int, int]:
        """(index, count): every one of the G*R ranks reads distinct data."""
        return self.rank, self.world_size

    def intra_ranks(self, group: int) -> list[int]:
        return [group * self.ranks_per_group + r for r in range(self.ranks_per_group)]

    def cross_ranks(self, dp_rank: int) -> list[int]:
        return [g * self.ranks_per_group + dp_rank for g in range(self.groups)]

    @classmethod
    def from_dist(cls, groups: int, timeout_s: float | None = None) -> Topology:
        """Build from an initialised default process group, creating every subgroup collectively.

        Subgroups do not inherit the default group's timeout (torch gives them 30 minutes), so a rank
        that stops answering would hold the others in an aggregation that long: pass the run's.
        """
        # Every subgroup uses the default group's backend, so one device serves them all.
        topo = cls(dist.get_world_size(), dist.get_rank(), groups, comm_device())
        timeout = None if timeout_s is None else datetime.timedelta(seconds=timeout_s)

        # Each rank creates only the three groups it belongs to (use_local_synchronization: non-members
        # take no part), so start-up makes 3 groups per rank, not W + G + R one after another.
        def own(ranks: list[int]) -> dist.ProcessGroup:
            return dist.new_group(ranks, timeout=timeout, use_local_synchronization=True)

        topo.intra_group = own(topo.intra_ranks(topo.group))
        topo.cross_group = own(topo.cross_ranks(topo.dp_rank))
        # DeepSpeed reduces overflow flags over a model-parallel group: here each rank alone.
        topo.model_parallel_group = own([topo.rank])
        return topo

    # --- the `mpu` view DeepSpeed asks for: no model parallelism, data parallel = our group ---
    def get_data_parallel_group(self):  # noqa: ANN201 - a torch ProcessGroup
        return self.intra_group

    def get_data_parallel_rank(self) -> int:
        return self.dp_rank

    def get_data_parallel_world_size(self) -> int:
        return self.ranks_per_group

    def get_data_parallel_group_ranks(self) -> list[int]:
        return self.intra_ranks(self.group)

    def get_model_parallel_group(self):  # noqa: ANN201
        return self.model_parallel_group

    def get_model_parallel_rank(self) -> int:
        return 0

    def get_model_parallel_world_size(self) -> int:
        return 1
