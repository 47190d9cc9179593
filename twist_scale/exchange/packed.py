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

import torch
import torch.distributed as dist

from twist_scale.exchange.base import SubnetSource
from twist_scale.exchange.entries import Entry, alike
from twist_scale.exchange.held import input_channels
from twist_scale.exchange.packed_plan import PackedPlan, ShardRange
from twist_scale.exchange.runs import by_entry, exclusive_cumsum, expand_ranges, gather_runs, take
from twist_scale.models import UnitBlock
from twist_scale.subnet import SubnetSpec

WIRE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


class PackedExchange(PackedPlan):
    """Moves only held elements between the engines' subnets and the central shards (see module doc)."""

    def __init__(self, central, wire: str = "fp32", shard_range: ShardRange | None = None) -> None:  # noqa: ANN001
        super().__init__(central, shard_range)
        self.wire = WIRE_DTYPES[wire]
        self.sends_changes = self.wire != torch.float32  # see module doc
        self.assembling: dict[str, torch.Tensor] = {}  # subnet tensors whose parts are still arriving
        self.dispatched: dict[str, torch.Tensor] = {}  # entry key -> this rank's stored shard as dispatched

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
        received, entry_at = by_entry(received, recv_lens)
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
        received, entry_at = by_entry(received, recv_lens)
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
