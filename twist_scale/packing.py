"""Packed, bucketed exchange between the groups' subnets and the sharded central model.

The full-width exchange (`aggregate.FullWidthExchange`) moves whole tensors, so its traffic ignores κ.
Here only held elements travel, and no rank needs a handshake to know how many: every rank knows every
group's spec, and `exchange_plan` says which elements a group holds in any range.

- Aggregation: every rank reads only its shard of its group's subnet tensor (a view of the engine's
  master values; `learn_layout` gathers who stores what once per run) and sends each owner the part in
  the owner's piece: one all-to-all over the world, nothing gathered first, every element sent by one
  rank of its group. An owner adds what each group sent where the group holds and divides by the holder
  count; elements nobody held keep their value. Bytes ∝ κ/R of the model.
- Dispatch: each owner sends every rank the elements of its piece that rank's group holds (one
  all-to-all over the world); the runs from owners 0, 1, ... concatenate into the flattened subnet
  tensor, ∝ κ of the model, or only the rank's shard where it stores one (ZeRO-3/FSDP; a ZeRO-1/2
  fragment of a moment): ∝ κ/R.

One all-to-all per bucket (`exchange_plan.buckets`); a tensor larger than a bucket is cut into parts,
the same sub-range of every owner's piece, so temporaries are bounded by the bucket. Dispatch is always
fp32, so a round starts from the central weights exactly. The aggregation payload can travel in bf16:
then each rank sends the change since dispatch, not the value (owners add the holder mean of the
changes in fp32), so an update smaller than half a bf16 ulp of its weight still arrives; the rank keeps
its stored shard as dispatched for that (fp32, ∝ κ/R of the model).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.distributed as dist

from twist_scale.exchange_plan import Entry, Held, alike, plan_buckets
from twist_scale.subnet import SubnetSpec

WIRE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
ShardRange = Callable[[torch.Size, int], "tuple[int, int] | None"]  # EngineStorage.shard_range
ShardOf = Callable[[str], tuple[int, int]]  # EngineStorage.shard_of


class PackedExchange:
    """Moves only held elements between the engines' subnets and the central shards (see module doc)."""

    def __init__(self, central, wire: str = "fp32", shard_range: ShardRange | None = None) -> None:  # noqa: ANN001
        self.central, self.topo, self.wire = central, central.topo, WIRE_DTYPES[wire]
        self.shard_range = shard_range  # the engine's, where it shards parameters
        self.assembling: dict[str, torch.Tensor] = {}  # subnet tensors whose parts are still arriving
        self.layout: dict[str, list[list[int]]] = {}  # name -> per world rank: [start, stop) of its subnet tensor
        self.ranged_state: dict[str, list[bool]] = {}  # name -> per world rank: stores only that range of moments
        self.sends_changes = self.wire != torch.float32  # see module doc
        self.dispatched: dict[str, torch.Tensor] = {}  # entry -> this rank's stored shard as dispatched (bf16 wire)

    def receives_shard(self, entry: Entry) -> bool:
        """Whether dispatch delivers only this rank's range of `entry` (flat), not the whole subnet tensor."""
        return self._ranged(entry, self.topo.rank)

    def _sharded(self, entry: Entry) -> bool:
        """The engine shards the parameter itself (ZeRO-3, FSDP): every rank's range follows from the shape."""
        return self.shard_range is not None and not entry.whole and self.shard_range(entry.shape, 0) is not None

    def _ranged(self, entry: Entry, rank: int) -> bool:
        """Whether world rank `rank` stores, and so receives, only a flat range of `entry`'s subnet tensor.

        Sharded parameters, and the moments of an engine that partitions only its optimizer state
        (ZeRO-1/2: the rank's fragment of the flat fp32 partition, from `learn_layout`).
        """
        name, _, key = entry.name.partition("@")
        return self._sharded(entry) or (bool(key) and name in self.ranged_state and self.ranged_state[name][rank])

    def _target(self, entry: Entry, spec: SubnetSpec, rank: int) -> tuple[int, int]:
        """The flat range of a group's subnet tensor that its world rank `rank` receives."""
        shape = self._received_shape(entry, spec)
        if self._sharded(entry):
            return self.shard_range(torch.Size(shape), rank % self.topo.ranks_per_group)
        if self._ranged(entry, rank):
            start, stop = self.layout[entry.name.partition("@")[0]][rank]
            return start, stop
        return 0, math.prod(shape)

    def plan(self, entries: list[Entry], bucket_bytes: int) -> list[list[Entry]]:
        return plan_buckets(entries, bucket_bytes, self.topo.world_size, self.central.piece_len)

    def _range(self, entry: Entry, piece: int) -> tuple[int, int]:
        """The flat range of the full tensor that `entry` covers in owner `piece`'s piece."""
        k = self.central.piece_len(entry.name)
        a, b = entry.part or (0, k)
        return min(piece * k + a, entry.numel), min(piece * k + b, entry.numel)

    def _shard(self, entry: Entry) -> torch.Tensor:
        """This owner's piece of `entry` (moments start at zero before their first aggregation)."""
        shards = self.central.shards
        if entry.name not in shards:
            shards[entry.name] = self.central.host(torch.zeros(self.central.piece_len(entry.name)))
        return shards[entry.name]

    def _run(self, held: Held, entry: Entry, piece: int) -> int:
        """How many of the held elements fall in `piece`: one contiguous run of the flattened subnet."""
        lo, hi = self._range(entry, piece)
        return held.before(hi) - held.before(lo)

    def _holders(self, bucket: list[Entry], spec: SubnetSpec, dispatch: bool) -> list[Held]:
        """Per entry, which elements the group with `spec` holds (one Held per run of `alike` entries)."""
        out = []
        for run in alike(bucket, dispatch):
            entry = bucket[run[0]]
            out += [Held(entry, None if dispatch and entry.whole else entry.units(spec))] * len(run)
        return out

    def _all_to_all(
        self,
        payload: torch.Tensor,
        in_splits: list[int],
        out_splits: list[int],
        group,  # noqa: ANN001
        dtype: torch.dtype,
        wire_elements: int,
    ) -> torch.Tensor:
        """One all-to-all of `payload` (on the host or the wire's device); `wire_elements` of it cross to or
        from other ranks."""
        device = self.topo.device
        payload = payload.to(device, dtype)
        recv = torch.empty(sum(out_splits), device=device, dtype=dtype)
        dist.all_to_all_single(recv, payload, out_splits, in_splits, group=group)
        self.central.traffic.add(wire_elements * payload.element_size())
        return recv.to("cpu", torch.float32)

    def learn_layout(self, entries: list[Entry], shard_of: ShardOf, ranged_state: Callable[[str], bool]) -> None:
        """Learn which flat range of its group's subnet tensor every rank stores (one collective, once).

        `shard_of(name)` is that range [start, stop) on this rank, `ranged_state(name)` whether it stores
        only that range of the moments (`EngineStorage.ranged_state`). A ZeRO-1/2 partition's layout
        depends on every parameter of the group, so it is gathered, not derived; it never changes
        afterwards (subnet shapes are fixed for the run).
        """
        names = list(dict.fromkeys(e.name.partition("@")[0] for e in entries))
        mine = torch.tensor([[*shard_of(n), ranged_state(n)] for n in names], dtype=torch.long).view(len(names), 3)
        every = torch.empty(self.topo.world_size * len(names), 3, dtype=torch.long, device=self.topo.device)
        dist.all_gather_into_tensor(every, mine.to(self.topo.device))
        every = every.cpu().view(self.topo.world_size, len(names), 3)
        R = self.topo.ranks_per_group
        self.layout = {name: every[:, i, :2].tolist() for i, name in enumerate(names)}
        self.ranged_state = {name: every[:, i, 2].bool().tolist() for i, name in enumerate(names)}
        for name, spans in self.layout.items():
            for g in range(self.topo.groups):
                mine = sorted(spans[g * R : (g + 1) * R])
                if [start for start, _ in mine] != [0] + [stop for _, stop in mine[:-1]]:
                    raise RuntimeError(f"{name}: group {g}'s ranks store {mine}, not one tiling of the tensor")

    def aggregate(
        self, bucket: list[Entry], read: Callable[[Entry], tuple[int, torch.Tensor]], specs: list[SubnetSpec]
    ) -> None:
        """Holder mean of the groups' subnet tensors into the shards, one all-to-all over the world.

        `read(entry)` gives (start, values): this rank's shard of its group's subnet tensor (a view of the
        engine's master values where it can be), so nothing is gathered and each element leaves one rank.
        """
        topo = self.topo
        W, R = topo.world_size, topo.ranks_per_group
        helds = [self._holders(bucket, specs[g], False) for g in range(topo.groups)]
        runs: list[list[torch.Tensor]] = [[] for _ in range(W)]  # per owner, in bucket order: views until sent
        for entry, held in zip(bucket, helds[topo.group], strict=True):
            # an engine on the accelerator reads there, statistics come from the host: one device to send from
            start, values = read(entry)
            values = values.to(topo.device)
            base = self.dispatched.get(entry.name)  # None: the change is the value (or the wire is fp32)
            for owner in range(W):
                lo, hi = self._range(entry, owner)
                a, b = max(held.before(lo), start), min(held.before(hi), start + len(values))
                run = values[a - start : max(a, b) - start]
                runs[owner].append(run if base is None else run - base[a - start : max(a, b) - start].to(run.device))
        in_splits = [sum(len(run) for run in owner) for owner in runs]
        # from each rank s of group s // R: the overlap of its group's run in my piece with the range s stores
        chunks = []  # per source rank, per entry: (where the chunk starts in the run, its length)
        for source in range(W):
            per_entry = []
            for entry, held in zip(bucket, helds[source // R], strict=True):
                lo, hi = self._range(entry, topo.rank)
                first, last = held.before(lo), held.before(hi)
                start, stop = self.layout[entry.name.partition("@")[0]][source]
                a, b = max(first, start), min(last, stop)
                per_entry.append((a - first, max(0, b - a)))
            chunks.append(per_entry)
        for g in range(topo.groups):  # the tiling reaches the end of every group's subnet tensor
            for entry, held in zip(bucket, helds[g], strict=True):
                end = max(stop for _, stop in self.layout[entry.name.partition("@")[0]][g * R : (g + 1) * R])
                if end != held.before(entry.numel):
                    raise RuntimeError(f"{entry.name}: group {g}'s ranks store {end} of {held.before(entry.numel)}")
        out_splits = [sum(n for _, n in per_entry) for per_entry in chunks]
        sent = sum(in_splits) - in_splits[topo.rank]  # to the other owners
        payload = torch.cat([run for owner in runs for run in owner] or [torch.empty(0, device=topo.device)])
        received = self._all_to_all(payload, in_splits, out_splits, None, self.wire, sent).split(
            [n for per_entry in chunks for _, n in per_entry]
        )
        del payload, runs  # sent: only what arrived is needed from here
        count_dtype = torch.uint8 if topo.groups < 256 else torch.int32
        for run in alike(bucket, False):
            lo, hi = self._range(bucket[run[0]], topo.rank)
            ats = [helds[g][run[0]].positions(lo, hi) for g in range(topo.groups)]  # where each group's run lands
            count = torch.zeros(hi - lo, dtype=count_dtype)
            for at in ats:
                if at is None:
                    count += 1
                else:
                    count.index_add_(0, at, torch.ones(1, dtype=count_dtype).expand(len(at)))
            held = count > 0
            count.clamp_(min=1)  # 1 where nobody held: dividing leaves those values as they are
            for i in run:
                # values are summed in the piece itself, so no piece-sized temporary but the count: held
                # elements restart from 0, take every holder's value and are divided by the holder count;
                # changes are summed apart and their holder mean added
                a = bucket[i].part[0] if bucket[i].part else 0
                piece = self._shard(bucket[i])[a : a + hi - lo]
                kept = torch.zeros(hi - lo) if self.sends_changes else piece.masked_fill_(held, 0.0)
                for g, at in enumerate(ats):
                    for source in range(g * R, (g + 1) * R):
                        offset, n = chunks[source][i]
                        values = received[source * len(bucket) + i]
                        if at is None:
                            kept[offset : offset + n] += values
                        else:
                            kept.index_add_(0, at[offset : offset + n], values)
                kept.div_(count)
                if self.sends_changes:
                    piece.add_(kept)

    def dispatch(self, bucket: list[Entry], specs: list[SubnetSpec]) -> dict[str, torch.Tensor]:
        """This group's subnet tensor (the full tensor for `whole` entries; this rank's flat shard where
        `receives_shard`) of every tensor whose last part is in `bucket`, by name, in bucket order.

        An owner's held elements of a piece are one run of the group's flattened subnet, and a rank's
        shard is one range of it: each rank gets the run's overlap with its shard.
        """
        topo = self.topo
        cuts, in_splits = [], []  # per destination rank, per entry: (piece, held positions or None, [a, b) of them)
        for group in range(topo.groups):  # what each rank gets from this owner's pieces
            held_runs = []  # per entry: this owner's piece, where the group holds in it, where its run starts
            helds = self._holders(bucket, specs[group], True)
            for run in alike(bucket, True):
                lo, hi = self._range(bucket[run[0]], topo.rank)
                held = helds[run[0]]
                at, start = held.positions(lo, hi), held.before(lo)
                for i in run:
                    a = bucket[i].part[0] if bucket[i].part else 0
                    held_runs.append((self.central.shards[bucket[i].name][a : a + hi - lo], at, start))
            for dp_rank in range(topo.ranks_per_group):
                sent = 0
                for entry, (piece, at, start) in zip(bucket, held_runs, strict=True):
                    s, t = self._target(entry, specs[group], group * topo.ranks_per_group + dp_rank)
                    first, last = max(start, s), min(start + (len(piece) if at is None else len(at)), t)
                    cuts.append((piece, at, first - start, max(first, last) - start))
                    sent += max(0, last - first)
                in_splits.append(sent)
        # the held elements are gathered straight into the payload: no per-entry copy to concatenate after
        payload, offset = torch.empty(sum(in_splits), pin_memory=self.central.pin), 0
        for piece, at, a, b in cuts:
            into = payload[offset : offset + b - a]
            if at is None:
                into.copy_(piece[a:b])
            else:
                torch.index_select(piece, 0, at[a:b], out=into)
            offset += b - a
        spec = specs[topo.group]
        mine = self._holders(bucket, spec, True)
        targets = [self._target(e, spec, topo.rank) for e in bucket]
        starts = [
            [h.before(self._range(e, owner)[0]) for h, e in zip(mine, bucket, strict=True)]
            for owner in range(topo.world_size)
        ]
        lengths = [
            [
                max(0, min(start + self._run(h, e, owner), t) - max(start, s))
                for h, e, start, (s, t) in zip(mine, bucket, starts[owner], targets, strict=True)
            ]
            for owner in range(topo.world_size)
        ]
        out_splits = [sum(owner) for owner in lengths]
        incoming = sum(out_splits) - out_splits[topo.rank]  # from the other owners
        # fp32 always: the engines' master weights start every round from these values exactly
        received = self._all_to_all(payload, in_splits, out_splits, None, torch.float32, incoming)
        del payload, cuts  # sent: only what arrived is needed from here
        runs = received.split([n for owner in lengths for n in owner])
        out = {}
        for i, entry in enumerate(bucket):
            s, t = targets[i]
            shape = [t - s] if self.receives_shard(entry) else self._received_shape(entry, spec)
            if entry.part is None:  # owners 0, 1, ... hold ascending flat ranges: their runs concatenate
                out[entry.name] = torch.cat([runs[owner * len(bucket) + i] for owner in range(topo.world_size)])
                out[entry.name] = out[entry.name].view(shape)
                continue
            flat = self.assembling.setdefault(entry.name, torch.empty(t - s))
            for owner in range(topo.world_size):  # each owner's run lands where its overlap starts
                run, first = runs[owner * len(bucket) + i], max(starts[owner][i], s) - s
                flat[first : first + len(run)] = run
            if entry.part[1] == self.central.piece_len(entry.name):
                out[entry.name] = self.assembling.pop(entry.name).view(shape)
        return out

    @staticmethod
    def _received_shape(entry: Entry, spec: SubnetSpec) -> list[int]:
        shape = list(entry.shape)
        if entry.unit is not None and not entry.whole:
            shape[entry.unit[1].axis] = len(entry.unit[1].index(entry.units(spec)))
        return shape
