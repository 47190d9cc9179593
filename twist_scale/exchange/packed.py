"""Packed, bucketed exchange between the groups' subnets and the sharded central model.

The full-width exchange (`exchange.full_width`) moves whole tensors, so its traffic ignores κ. Here only
held elements travel, and no rank needs a handshake to know how many: every rank knows every group's
spec, and `exchange.held` says which elements each group holds in any range.

- Aggregation: every rank reads only its shard of its group's subnet tensor (a view of the engine's
  master values; `prepare` gathers who stores what once per run) and sends each owner the part in the
  owner's piece: one all-to-all over the world, nothing gathered first, every element sent by one rank
  of its group. An owner adds what each group sent where the group holds and divides by the holder
  count; elements nobody held keep their value. Bytes ∝ κ/R of the model.
- Dispatch: each owner sends every rank the elements of its piece that rank's group holds (one
  all-to-all over the world); the runs from owners 0, 1, ... concatenate into the flattened subnet
  tensor, ∝ κ of the model, or only the rank's shard where it stores one (ZeRO-3/FSDP; a ZeRO-1/2
  fragment of a moment): ∝ κ/R.
- Shifts (correction `mean`): each owner sums, over its piece of an output projection, what every
  group's dropped units contribute to each output row, and sends each rank its group's rows: a rank
  receives one hidden-size vector per block, never the full projection.

Every split, offset and index of a bucket is computed for all W ranks and G groups at once, as tensors:
no Python loop runs over ranks or groups per entry. Buckets hold about `bucket_bytes` per rank on the
wire, a tensor larger than one cut into parts (`entries.plan_buckets`), so temporaries are bounded by the
bucket. Dispatch is always fp32, so a round starts from the central weights exactly. The aggregation
payload can travel in bf16: then each rank sends the change since dispatch, not the value (owners add
the holder mean of the changes in fp32), so an update smaller than half a bf16 ulp of its weight still
arrives; the rank keeps its stored shard as dispatched for that (fp32, ∝ κ/R of the model).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.distributed as dist

from twist_scale.exchange.base import SubnetSource
from twist_scale.exchange.entries import Entry, alike, plan_buckets
from twist_scale.exchange.held import (
    HeldGroups,
    PieceColumns,
    PieceRows,
    exclusive_cumsum,
    expand_ranges,
    gather_runs,
    input_channels,
    take,
    unit_masks,
)
from twist_scale.models import UnitBlock
from twist_scale.subnet import SubnetSpec

WIRE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
ShardRange = Callable[[torch.Size, int], "tuple[int, int] | None"]  # EngineStorage.shard_range


class PackedExchange:
    """Moves only held elements between the engines' subnets and the central shards (see module doc)."""

    def __init__(self, central, wire: str = "fp32", shard_range: ShardRange | None = None) -> None:  # noqa: ANN001
        self.central, self.topo, self.wire = central, central.topo, WIRE_DTYPES[wire]
        self.shard_range = shard_range  # the engine's, where it shards parameters
        self.sends_changes = self.wire != torch.float32  # see module doc
        self.assembling: dict[str, torch.Tensor] = {}  # subnet tensors whose parts are still arriving
        self.columns: dict[str, int] = {}  # tensor name -> its column in `stored` and `ranged`
        self.stored = torch.empty(0, 0, 2, dtype=torch.long)  # (W, names, 2): each rank's [start, stop)
        self.ranged = torch.empty(0, 0, dtype=torch.bool)  # (W, names): it stores only that range of moments
        self.dispatched: dict[str, torch.Tensor] = {}  # entry key -> this rank's stored shard as dispatched
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

    def _all_to_all(
        self, payload: torch.Tensor, in_splits: torch.Tensor, out_splits: torch.Tensor, dtype: torch.dtype, wire: int
    ) -> torch.Tensor:
        """One all-to-all of `payload` (on the host or the wire's device); `wire` of its elements cross to or
        from other ranks."""
        device = self.topo.device
        payload = payload.to(device, dtype)
        recv = torch.empty(int(out_splits.sum()), device=device, dtype=dtype)
        dist.all_to_all_single(recv, payload, out_splits.tolist(), in_splits.tolist())
        self.central.traffic.add(wire * payload.element_size())
        return recv.to("cpu", torch.float32)

    def _shard(self, entry: Entry) -> torch.Tensor:
        """This owner's piece of `entry` (moments start at zero before their first aggregation)."""
        shards = self.central.shards
        if entry.key not in shards:
            shards[entry.key] = self.central.host(torch.zeros(self.central.piece_len(entry.key)))
        return shards[entry.key]

    # -- aggregation ----------------------------------------------------------------------------------

    def note_dispatched(self, entries: list[Entry], source: SubnetSource) -> None:
        if self.sends_changes:
            self.dispatched = {e.key: source.stored(e) for e in entries}

    def aggregate(self, bucket: list[Entry], source: SubnetSource, specs: list[SubnetSpec]) -> None:
        """Holder mean of the groups' subnet tensors into the shards, one all-to-all over the world.

        `source.read_shard(entry)` gives (start, values): this rank's shard of its group's subnet tensor
        (a view of the engine's master values where it can be), so nothing is gathered and each element
        leaves one rank.
        """
        topo = self.topo
        W, E, me = topo.world_size, len(bucket), topo.group
        helds = {run[0]: self._holders(bucket[run[0]], specs, False) for run in alike(bucket)}
        send_from, send_lens = torch.zeros(W, E, dtype=torch.long), torch.zeros(W, E, dtype=torch.long)
        recv_lens = torch.zeros(W, E, dtype=torch.long)
        values = []
        for run in alike(bucket):  # a weight and its moments: the same held runs, the same ranges
            entry, held = bucket[run[0]], helds[run[0]]
            lo, hi = self._ranges(entry)  # to every owner: my stored range's overlap with the group's run there
            mine = held.before(torch.stack([lo, hi]).flatten(), me).view(2, W)
            # from every source rank: its stored range's overlap with its group's run in my piece
            my_lo, my_hi = self._my_range(entry)
            first, last = held.before(torch.tensor([my_lo, my_hi])).unbind(1)  # (G,) each
            spans, totals = self.stored[:, self._column(entry)], held.total
            ends = spans[:, 1].view(topo.groups, -1).max(1).values
            if not torch.equal(ends, totals):
                g = int((ends != totals).nonzero()[0])
                raise RuntimeError(f"{entry.key}: group {g}'s ranks store {int(ends[g])} of {int(totals[g])}")
            a = torch.maximum(first[self.group_of], spans[:, 0])
            b = torch.minimum(last[self.group_of], spans[:, 1])
            arriving = (b - a).clamp(min=0)
            for i in run:
                # an engine on the accelerator reads there, statistics come from the host: one device to send from
                start, value = source.read_shard(bucket[i])
                value = value.to(topo.device)
                base = self.dispatched.get(bucket[i].key)  # None: the change is the value (or the wire is fp32)
                values.append(value if base is None else value - base.to(value.device))
                a, b = mine[0].clamp(min=start), mine[1].clamp(max=start + len(value))
                send_from[:, i], send_lens[:, i] = a - start, (b - a).clamp(min=0)
                recv_lens[:, i] = arriving
        payload = gather_runs(values, send_from, send_lens) if values else torch.empty(0, device=topo.device)
        in_splits, out_splits = send_lens.sum(1), recv_lens.sum(1)
        sent = int(in_splits.sum() - in_splits[topo.rank])  # to the other owners
        received = self._all_to_all(payload, in_splits, out_splits, self.wire, sent)
        del payload, values  # sent: only what arrived is needed from here
        received, entry_at = self._by_entry(received, recv_lens)
        for run in alike(bucket):
            lo, hi = self._my_range(bucket[run[0]])
            rows = self._in_piece(bucket[run[0]], helds[run[0]])
            holders = torch.full((1,), topo.groups) if rows is None else rows.holder_counts.clamp(min=1)
            for i in run:
                # values are summed in the piece itself, row by row: held rows restart from 0, take every
                # holder's value and are divided by the holder count (1 where nobody held: those rows keep
                # their values); changes are summed apart and their mean added. Each group's sources
                # arrive in the order of its run, group after group, as `PieceRows.select` lists them
                a = bucket[i].part[0] if bucket[i].part else 0
                piece = self._shard(bucket[i])[a : a + hi - lo]
                arrived = received[entry_at[i] : entry_at[i + 1]]
                if rows is None:  # every group sent the whole piece
                    kept = torch.zeros(hi - lo) if self.sends_changes else piece.zero_()
                    kept += arrived.view(topo.groups, hi - lo).sum(0)
                    kept.div_(holders)
                else:
                    kept = rows.padded(torch.zeros(hi - lo) if self.sends_changes else piece)
                    if not self.sends_changes:
                        kept.masked_fill_(rows.holder_counts > 0, 0.0)
                    rows.add_to(kept, arrived)
                    kept = rows.unpadded(kept.div_(holders))
                if self.sends_changes:
                    piece.add_(kept)
                elif kept.data_ptr() != piece.data_ptr():  # the piece was padded to whole rows: a copy
                    piece.copy_(kept)

    @staticmethod
    def _by_entry(received: torch.Tensor, recv_lens: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
        """What an all-to-all delivered source after source, reordered entry after entry in one copy (a view
        where a bucket holds one entry), and where each entry's chunks (sources 0, 1, ... in order) start
        and end: (E + 1,) offsets."""
        recv_at = exclusive_cumsum(recv_lens)  # (W, E): where each (source, entry) chunk starts in `received`
        entry_at = torch.cat([torch.zeros(1, dtype=torch.long), recv_lens.sum(0).cumsum(0)]).tolist()
        return take(received, recv_at.T, recv_lens.T), entry_at

    # -- dispatch -------------------------------------------------------------------------------------

    def dispatch(self, bucket: list[Entry], specs: list[SubnetSpec]) -> dict[str, torch.Tensor]:
        """This group's subnet tensor (the full tensor for `whole` entries; this rank's flat shard where
        `receives_shard`) of every entry whose last part is in `bucket`, by key, in bucket order.

        An owner's held elements of a piece are one run of each group's flattened subnet, and a rank's
        shard is one range of it: each rank gets the run's overlap with its shard.
        """
        topo = self.topo
        W, E, me = topo.world_size, len(bucket), topo.group
        send_from, send_lens = torch.zeros(W, E, dtype=torch.long), torch.zeros(W, E, dtype=torch.long)
        recv_lens, places = torch.zeros(W, E, dtype=torch.long), torch.zeros(W, E, dtype=torch.long)
        values, targets = [], []
        for run in alike(bucket):
            held = self._holders(bucket[run[0]], specs, True)
            lo, hi = self._my_range(bucket[run[0]])
            rows = self._in_piece(bucket[run[0]], held)
            if rows is None:  # every group holds the whole piece
                counts = torch.full((topo.groups,), hi - lo)
                group_start = torch.zeros(topo.groups, dtype=torch.long)[self.group_of]
            else:  # where each group's held elements begin in `rows.select`
                counts = rows.counts
                group_start = exclusive_cumsum(counts)[self.group_of]
            first = held.before(torch.tensor([lo]))[:, 0]  # (G,) where each group's run starts in its subnet
            owners_lo, owners_hi = self._ranges(bucket[run[0]])
            mine = held.before(torch.stack([owners_lo, owners_hi]).flatten(), me).view(2, W)
            for i in run:
                target = self._targets(bucket[i], held)  # a weight's moments may be stored by range
                # to every rank, in rank order: its group's run in my piece, cut to the range it receives
                start, stop = first[self.group_of], (first + counts)[self.group_of]
                s, t = torch.maximum(start, target[:, 0]), torch.minimum(stop, target[:, 1])
                lengths = (t - s).clamp(min=0)
                a = bucket[i].part[0] if bucket[i].part else 0
                piece = self.central.shards[bucket[i].key][a : a + hi - lo]
                held_values = piece if rows is None else rows.select(piece)  # every group's, group after group
                sent = take(held_values, group_start + s - start, lengths)
                values.append(sent)
                send_from[:, i], send_lens[:, i] = exclusive_cumsum(lengths), lengths
                # from every owner: my group's run in its piece, cut to the range I receive
                s, t = target[topo.rank]
                a, b = mine[0].clamp(min=int(s)), mine[1].clamp(max=int(t))
                recv_lens[:, i], places[:, i] = (b - a).clamp(min=0), a - s
                targets.append((int(s), int(t)))
        payload = gather_runs(values, send_from, send_lens) if values else torch.empty(0)  # rank-major
        in_splits, out_splits = send_lens.sum(1), recv_lens.sum(1)
        incoming = int(out_splits.sum() - out_splits[topo.rank])  # from the other owners
        # fp32 always: the engines' master weights start every round from these values exactly
        received = self._all_to_all(payload, in_splits, out_splits, torch.float32, incoming)
        del payload, values  # sent: only what arrived is needed from here
        received, entry_at = self._by_entry(received, recv_lens)
        out = {}
        for i, entry in enumerate(bucket):
            s, t = targets[i]
            arrived = received[entry_at[i] : entry_at[i + 1]]  # from owners 0, 1, ...: ascending places
            flat = self.assembling.pop(entry.key, None)
            if flat is None and entry.part is None:
                flat = arrived  # the owners' runs tile the range this rank receives
            else:
                flat = torch.empty(t - s) if flat is None else flat
                flat[expand_ranges(places[:, i], recv_lens[:, i])] = arrived
            if entry.part is not None and entry.part[1] != self.central.piece_len(entry.key):
                self.assembling[entry.key] = flat  # more parts to come
                continue
            out[entry.key] = flat if self.receives_shard(entry) else flat.view(self._subnet_shape(entry, t - s))
        return out

    # -- the mean correction's shifts -----------------------------------------------------------------

    def shifts(
        self, outputs: list[tuple[UnitBlock, Entry]], specs: list[SubnetSpec], means: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """Each owner's partial W[:, dropped] @ E[a_dropped] over its piece of every output projection, for
        every group; each rank receives its group's rows from every owner (one all-to-all) and sums them."""
        topo = self.topo
        W = topo.world_size
        partials, rows, lengths = [], [], []
        for unit_block, entry in outputs:
            out_dim, rows_lo, rows_hi = self._output_rows(unit_block, entry)
            lo, hi = self._my_range(entry)
            held = self._holders(entry, specs, False)
            flat = torch.arange(lo, hi)
            axis = unit_block.output_input_axis
            channels_in = entry.shape[axis]
            channel = input_channels(flat, entry.shape, axis)
            row = torch.div(flat, channels_in, rounding_mode="floor") if axis == 1 else flat % out_dim
            weighted = self.central.shards[entry.key][: hi - lo] * means[unit_block.output_module][channel]
            mine_lo, mine_hi = int(rows_lo[topo.rank]), int(rows_hi[topo.rank])
            partial = torch.zeros(topo.groups, mine_hi - mine_lo)
            partial.index_add_(1, row - mine_lo, (~held.along[:, channel]) * weighted)
            partials.append(partial)
            rows.append((rows_lo, rows_hi, out_dim))
            lengths.append(rows_hi - rows_lo)
        lengths_w = torch.stack(lengths, 1) if lengths else torch.zeros(W, 0, dtype=torch.long)  # (W owners, blocks)
        # to rank d, block after block: group(d)'s rows of my partial sums
        mine = lengths_w[topo.rank]
        payload = torch.cat([p[self.group_of] for p in partials], 1) if partials else torch.empty(W, 0)
        in_splits = torch.full((W,), int(mine.sum()))
        out_splits = lengths_w.sum(1)
        incoming = int(out_splits.sum() - out_splits[topo.rank])  # from the other owners, as dispatch counts
        received = self._all_to_all(payload.flatten(), in_splits, out_splits, torch.float32, incoming)
        at = exclusive_cumsum(lengths_w)
        out = {}
        for b, (unit_block, _) in enumerate(outputs):
            rows_lo, rows_hi, out_dim = rows[b]
            shift = torch.zeros(out_dim)
            shift.index_add_(
                0, expand_ranges(rows_lo, lengths_w[:, b]), received[expand_ranges(at[:, b], lengths_w[:, b])]
            )
            out[unit_block.output_module] = shift
        return out

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
