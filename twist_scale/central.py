"""The central model: every full-width tensor flattened and sharded over the world, one piece per rank.

Rank (g, r) — global rank g*R + r — owns piece g*R + r of every flattened full-width tensor (parameters,
unit statistics, optimizer moments as `name@moment`). The exchanges (`twist_scale.exchange`) read and
write these pieces; this store counts what they put on the wire (`traffic`).

Shards live in host memory (pinned when collectives run on CUDA) and only the payload of each
collective is staged on the communication device: the central model is fp32 weights plus moments,
touched once per round, and accelerator memory is kept for the subnet being trained.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

from twist_scale.topology import Topology


@dataclass
class Traffic:
    """What the synchronisation put on the wire: collectives, and payload bytes this rank sent (aggregation)
    or received (dispatch, gathers) to or from other ranks; its own part never leaves the process."""

    bytes: int = 0
    collectives: int = 0

    def add(self, payload_bytes: int) -> None:
        self.bytes += payload_bytes
        self.collectives += 1


class CentralShards:
    """Full-width tensors (parameters, unit statistics, optimizer moments), sharded world-wide."""

    def __init__(self, topo: Topology, shapes: dict[str, torch.Size]) -> None:
        self.topo = topo
        self.shapes = dict(shapes)
        self.shards: dict[str, torch.Tensor] = {}
        self.pin = topo.device.type == "cuda"  # page-locked host memory: asynchronous DMA to the GPU
        self.traffic = Traffic()  # collective payloads this rank moved since the last read, for tracking

    def piece_len(self, name: str) -> int:
        n = self.shapes[name.split("@")[0]].numel()
        return -(-n // self.topo.world_size)

    def padded_flat(self, full: torch.Tensor, name: str) -> torch.Tensor:
        """The tensor flattened and zero-padded to world_size equal pieces."""
        pad = self.piece_len(name) * self.topo.world_size - full.numel()
        return torch.nn.functional.pad(full.detach().flatten().float(), (0, pad))

    def piece_range(self, name: str) -> tuple[int, int] | None:
        """The flat range [lo, hi) of tensor `name` this rank owns (short or empty at the end); None when
        the central model does not hold `name`."""
        if name.split("@")[0] not in self.shapes:
            return None
        n, k = self.shapes[name.split("@")[0]].numel(), self.piece_len(name)
        return min(self.topo.rank * k, n), min((self.topo.rank + 1) * k, n)

    def set_piece(self, name: str, values: torch.Tensor) -> None:
        """Keep `values`, this rank's `piece_range` of tensor `name` (zero-padded to the piece length)."""
        piece = torch.zeros(self.piece_len(name))
        piece[: values.numel()] = values.detach().flatten()
        self.shards[name] = self.host(piece)

    def host(self, t: torch.Tensor) -> torch.Tensor:
        """`t` as an fp32 host tensor, the form every shard is kept in (copied only to convert or pin)."""
        t = t.to("cpu", torch.float32)
        return t.pin_memory() if self.pin else t

    def set_full(self, name: str, full: torch.Tensor) -> None:
        """Keep this rank's piece of a full tensor every rank holds (initialisation, pretrained load)."""
        lo, hi = self.piece_range(name)
        self.set_piece(name, full.detach().flatten()[lo:hi])

    def load_resharded(self, old_shards: Sequence[dict[str, torch.Tensor]], old_world: int) -> None:
        """This rank's pieces, cut from the pieces a world of `old_world` ranks kept (same flat layout)."""
        self.shards = {}
        for name in old_shards[0]:
            n, (lo, hi) = self.shapes[name.split("@")[0]].numel(), self.piece_range(name)
            old_k = -(-n // old_world)
            piece = torch.zeros(self.piece_len(name))
            for q in range(lo // old_k, -(-hi // old_k)):  # the old pieces this range overlaps
                a, b = max(lo, q * old_k), min(hi, (q + 1) * old_k)
                piece[a - lo : b - lo] = old_shards[q][name][a - q * old_k : b - q * old_k]
            self.shards[name] = self.host(piece)

    def gather(self, name: str, dst: int | None = None) -> torch.Tensor | None:
        """The full tensor, reassembled from every rank's piece (one collective over the world): on every
        rank, or on rank `dst` only (None elsewhere), which is all an export needs."""
        shard = self.shards[name].to(self.topo.device, non_blocking=True)
        world = self.topo.world_size
        if dst is None:
            out = torch.empty(shard.numel() * world, device=shard.device)
            dist.all_gather_single(out, shard)
        else:
            parts = [torch.empty_like(shard) for _ in range(world)] if self.topo.rank == dst else None
            dist.gather(shard, parts, dst=dst)
            if parts is None:
                return None
            out = torch.cat(parts)
        self.traffic.add((out.numel() - shard.numel()) * out.element_size())  # received from the other ranks
        shape = self.shapes[name.split("@")[0]]
        return out[: shape.numel()].view(shape).cpu()
