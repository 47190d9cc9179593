"""The packed exchange's plan: what every rank stores, and which elements each group holds where.

It is index arithmetic only, learned once per run, tensor or unit block and the same on every rank, so
it stands apart from the collectives (`exchange.packed`) that move values bucket by bucket with it.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.distributed as dist

from twist_scale.exchange.base import SubnetSource
from twist_scale.exchange.entries import Entry, plan_buckets
from twist_scale.exchange.held import HeldGroups, unit_masks
from twist_scale.exchange.pieces import PieceColumns, PieceRows
from twist_scale.models import UnitBlock
from twist_scale.subnet import SubnetSpec

ShardRange = Callable[[torch.Size, int], "tuple[int, int] | None"]  # EngineStorage.shard_range


class PackedPlan:
    """Every split, range and run of a bucket of the packed exchange, for all W ranks and G groups at once."""

    def __init__(self, central, shard_range: ShardRange | None = None) -> None:  # noqa: ANN001
        self.central, self.topo = central, central.topo
        self.shard_range = shard_range  # the engine's, where it shards parameters
        self.columns: dict[str, int] = {}  # tensor name -> its column in `stored` and `ranged`
        self.stored = torch.empty(0, 0, 2, dtype=torch.long)  # (W, names, 2): each rank's [start, stop)
        self.ranged = torch.empty(0, 0, dtype=torch.bool)  # (W, names): it stores only that range of moments
        self._masks: tuple[object, object, torch.Tensor | None, dict] = (None, None, None, {})  # the last block's
        self._held: tuple[object, HeldGroups | None] = (None, None)  # the last tensor's holders
        self._piece: tuple[object, object, object] = (None, None, None)  # their rows in my piece
        self._held_specs: list[SubnetSpec] | None = None  # the round `_held` belongs to
        group_of = torch.arange(self.topo.world_size) // self.topo.ranks_per_group
        self.group_of: torch.Tensor = group_of  # (W,): every rank's group

    # -- what every rank stores, learned once per run ------------------------------------------------

    def prepare(self, entries: list[Entry], source: SubnetSource) -> None:
        """Learn which flat range of its group's subnet tensor every rank stores (one collective, once).

        A ZeRO-1/2 partition's layout depends on every parameter of the group, so it is gathered, not
        derived; it never changes afterwards (subnet shapes are fixed for the run).
        """
        names = list(dict.fromkeys(e.name for e in entries))
        self.columns = {name: i for i, name in enumerate(names)}
        mine = torch.tensor([[*source.shard_of(n), source.ranged_state(n)] for n in names], dtype=torch.long)
        mine = mine.view(len(names), 3)
        every = torch.empty(self.topo.world_size * len(names), 3, dtype=torch.long, device=self.topo.device)
        dist.all_gather_into_tensor(every, mine.to(self.topo.device))
        every = every.cpu().view(self.topo.world_size, len(names), 3)
        self.stored, self.ranged = every[:, :, :2].clone(), every[:, :, 2].bool()
        # each group's ranks, in dp order, tile [0, their end) (ranks storing nothing aside): so what a
        # group's ranks send an owner arrives in the order of the group's run there
        G, R = self.topo.groups, self.topo.ranks_per_group
        spans = self.stored.view(G, R, len(names), 2)
        starts, stops = spans[..., 0], spans[..., 1]
        reached = torch.cat([torch.zeros_like(stops[:, :1]), stops.cummax(1).values[:, :-1]], 1)
        tiled = ((starts == reached) | (starts == stops)).all(1)
        if not bool(tiled.all()):
            g, i = (~tiled).nonzero()[0].tolist()
            raise RuntimeError(
                f"{names[i]}: group {g}'s ranks store {spans[g, :, i].tolist()}, not one tiling in order"
            )

    def _column(self, entry: Entry) -> int:
        return self.columns[entry.name]

    def _sharded(self, entry: Entry) -> bool:
        """The engine shards the parameter itself (ZeRO-3, FSDP): every rank's range follows from the shape."""
        return self.shard_range is not None and not entry.whole and self.shard_range(entry.shape, 0) is not None

    def receives_shard(self, entry: Entry) -> bool:
        """Sharded parameters, and the moments of an engine that partitions only its optimizer state
        (ZeRO-1/2: the rank's fragment of the flat fp32 partition, from `prepare`)."""
        if entry.whole:
            return False
        return self._sharded(entry) or (bool(entry.moment) and bool(self.ranged[self.topo.rank, self._column(entry)]))

    @functools.cache  # noqa: B019 - fixed for the run, asked once per part of every tensor in every plan
    def _per_rank(self, entry: Entry) -> int:
        """The most elements of `entry` one rank sends or receives, the same on every rank: what a bucket holds."""
        if entry.whole:
            return entry.numel
        spans = self.stored[:, self._column(entry)]
        largest = int((spans[:, 1] - spans[:, 0]).max())
        ranged = self._sharded(entry) or (bool(entry.moment) and bool(self.ranged[:, self._column(entry)].all()))
        return largest if ranged else largest * self.topo.ranks_per_group  # whole subnet tensors on each rank

    def plan(self, entries: list[Entry], bucket_bytes: int) -> list[list[Entry]]:
        return plan_buckets(entries, bucket_bytes, self.central.piece_len, self._per_rank)

    # -- index arithmetic over every rank and group ---------------------------------------------------

    def _holders(self, entry: Entry, specs: list[SubnetSpec], dispatch: bool) -> HeldGroups:
        """Which elements each group holds; made once for a weight and its moments, which follow it."""
        whole = entry.unit is None or (dispatch and entry.whole)
        key = (entry.name, whole)
        if self._held[0] != key or self._held_specs is not specs:
            self._held_specs = specs
            if whole:
                held = HeldGroups(entry.shape, None, None, self.topo.groups)
            else:
                masks, layouts = self._unit_masks(entry.unit[0], specs)
                size = entry.shape[entry.unit[1].axis]
                laid_out = (entry.unit[1].runs, size)  # tensors of the block whose unit axis is laid out alike
                if laid_out not in layouts:
                    layouts[laid_out] = HeldGroups.layout(entry.unit, masks, size)
                held = HeldGroups(entry.shape, entry.unit, masks, self.topo.groups, layouts[laid_out])
            self._held = key, held
        return self._held[1]

    def _in_piece(self, entry: Entry, held: HeldGroups) -> PieceRows | PieceColumns | None:
        """`held.piece_rows` over this owner's range of `entry`, once for a weight and its moments."""
        lo, hi = self._my_range(entry)
        cached_held, cached_range, value = self._piece
        if cached_held is not held or cached_range != (lo, hi):
            value = held.piece_rows(lo, hi)
            self._piece = held, (lo, hi), value
        return value

    def _unit_masks(self, unit_block: UnitBlock, specs: list[SubnetSpec]) -> tuple[torch.Tensor, dict]:
        """(G, n) of one round, and the block's `HeldGroups.layout`s: made once per unit block while its
        tensors pass."""
        round_, block, masks, layouts = self._masks
        if round_ is not specs or block != unit_block.key:
            drawn = specs[0].drawn
            if drawn is not None and unit_block.key in drawn and all(s.drawn is drawn for s in specs):
                masks = drawn[unit_block.key]  # the sampler's own draw
            else:
                masks = unit_masks(unit_block, [spec.units(unit_block) for spec in specs])
            self._masks = round_, block, masks, layouts = specs, unit_block.key, masks, {}
        return masks, layouts

    def _ranges(self, entry: Entry) -> tuple[torch.Tensor, torch.Tensor]:
        """(W,) each: the flat range [lo, hi) of the full tensor that `entry` covers in every owner's piece."""
        k = self.central.piece_len(entry.key)
        a, b = entry.part or (0, k)
        owners = torch.arange(self.topo.world_size)
        return (owners * k + a).clamp(max=entry.numel), (owners * k + b).clamp(max=entry.numel)

    def _my_range(self, entry: Entry) -> tuple[int, int]:
        """The part of this owner's piece (`CentralShards.piece_range`) that `entry` covers."""
        lo, hi = self.central.piece_range(entry.key)
        a, b = entry.part or (0, hi - lo)
        return min(lo + a, hi), min(lo + b, hi)

    def _targets(self, entry: Entry, held: HeldGroups) -> torch.Tensor:
        """(W, 2): the flat range of its group's subnet tensor each rank receives in dispatch."""
        W = self.topo.world_size
        if entry.whole:
            return torch.tensor([0, entry.numel]).expand(W, 2)
        totals = held.total  # (G,) elements of each group's subnet tensor
        if self._sharded(entry):
            sizes, inverse = torch.unique(totals, return_inverse=True)  # groups of equal kappa share a shape
            tables = torch.stack([self._shard_table(self._subnet_shape(entry, int(n))) for n in sizes])
            return tables[inverse[self.group_of], torch.arange(W) % self.topo.ranks_per_group]
        whole = torch.stack([torch.zeros_like(totals), totals], 1)[self.group_of]
        if entry.moment:
            return torch.where(self.ranged[:, self._column(entry), None], self.stored[:, self._column(entry)], whole)
        return whole

    @staticmethod
    def _subnet_shape(entry: Entry, elements: int) -> torch.Size:
        """The shape of a subnet tensor of `entry` with `elements` elements (only its unit axis is shorter)."""
        if entry.unit is None:
            return entry.shape
        shape, axis = list(entry.shape), entry.unit[1].axis
        shape[axis] = elements // (entry.numel // entry.shape[axis])
        return torch.Size(shape)

    @functools.cache  # noqa: B019 - one table per subnet shape, for the exchange's (the run's) lifetime
    def _shard_table(self, shape: torch.Size) -> torch.Tensor:
        """(R, 2): the engine's shard range of each dp rank for a subnet tensor of `shape`."""
        return torch.tensor([self.shard_range(shape, r) for r in range(self.topo.ranks_per_group)])

    def _output_rows(self, unit_block: UnitBlock, entry: Entry) -> tuple[int, torch.Tensor, torch.Tensor]:
        """The output size and (W,) each: the output rows [lo, hi) that every owner's piece of the output
        projection touches (all of them when a piece spans more than one row of a (channels, outputs) weight)."""
        lo, hi = self._ranges(entry)
        axis = unit_block.output_input_axis
        out_dim = entry.shape[1 - axis]
        empty = hi <= lo
        if axis == 1:  # (outputs, channels): a piece is a run of output rows
            channels = entry.shape[1]
            rows_lo = torch.div(lo, channels, rounding_mode="floor")
            rows_hi = torch.div(hi - 1, channels, rounding_mode="floor") + 1
        else:  # (channels, outputs): within one channel row a piece is a run of outputs, else all of them
            one_row = torch.div(lo, out_dim, rounding_mode="floor") == torch.div(hi - 1, out_dim, rounding_mode="floor")
            rows_lo = torch.where(one_row, lo % out_dim, 0)
            rows_hi = torch.where(one_row, (hi - 1) % out_dim + 1, out_dim)
        return out_dim, torch.where(empty, 0, rows_lo), torch.where(empty, 0, rows_hi)
