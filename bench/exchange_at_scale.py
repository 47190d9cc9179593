"""One rank's exchange at scale, for `at_scale.py`: the packed exchange's real code on a fake process group,
with an engine that stores what FSDP2 would store and reads zeros.

Per rank per round: CPU seconds of aggregation and dispatch (the plan — every split, offset and position
— and the local packing of payloads; the network's time aside, as the fake group returns at once),
bytes each phase puts on the wire and collectives, with correction `none` and `mean`, and the
exchange's metadata. The previous release's exchange (`PREVIOUS`, loaded from git: its code is gone from
the tree) runs on a sample of its own buckets, spread evenly over its plan, and is extrapolated to all
of them: at W = 4,096 it needs hours per round.
"""

from __future__ import annotations

import contextlib
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from measure import REPO
from torch import nn

from twist_scale.central import CentralShards
from twist_scale.correction import SHIFT, correction_of, is_statistic
from twist_scale.engines.base import even_range
from twist_scale.engines.storage import EngineStorage
from twist_scale.exchange import PackedExchange, held, packed, packed_plan, runs
from twist_scale.models import UnitBlock
from twist_scale.subnet import SubnetSpec, axis_of
from twist_scale.sync import SubnetSync
from twist_scale.topology import Topology

PREVIOUS = "7036101"  # the last commit with the previous exchange (twist_scale/packing.py)
MOMENTS = ("exp_avg", "exp_avg_sq")  # Adam's, aggregated (--twist.optimizer_state aggregate)
SAMPLED_BUCKETS = 6  # of the previous exchange's plan, per phase


class FsdpLikeStorage(EngineStorage):
    """What the exchange sees of an FSDP2 engine, without one: each rank stores dim-0 rows of its group's
    subnet tensors (and their moments); reads are zeros, writes are dropped."""

    def __init__(self, subnet_shapes: dict[str, torch.Size], out_dims: dict[str, int], topo: Topology) -> None:
        self.shapes, self.out_dims, self.topo = subnet_shapes, out_dims, topo
        self.params = {}
        self.modules: dict[str, nn.Module] = {}

    def shard_range(self, shape: torch.Size, dp_rank: int) -> tuple[int, int]:
        first, last = even_range(shape[0], self.topo.ranks_per_group, dp_rank)
        return first * math.prod(shape[1:]), last * math.prod(shape[1:])

    def shard_of(self, name: str) -> tuple[int, int]:
        return self.shard_range(self.shapes[name], self.topo.dp_rank)

    def ranged_state(self, name: str) -> bool:
        return True

    def read_shard(self, name: str, key: str = "") -> torch.Tensor:
        start, stop = self.shard_of(name)
        return torch.zeros(stop - start)

    def read_buffer(self, name: str) -> torch.Tensor:
        return torch.zeros(self.shapes[name])

    def write_buffer(self, name: str, value: torch.Tensor) -> None: ...

    def write_shard(self, name: str, key: str, flat: torch.Tensor) -> None: ...

    def read(self, name: str) -> torch.Tensor:
        raise NotImplementedError("the packed exchange reads shards")

    def write(self, name: str, value: torch.Tensor) -> None: ...

    def read_state(self, name: str, key: str) -> torch.Tensor:
        raise NotImplementedError("the packed exchange reads shards")

    def write_state(self, name: str, key: str, value: torch.Tensor) -> None: ...

    def reset_optimizer_state(self) -> None: ...

    def submodule(self, name: str) -> nn.Module:
        if name not in self.modules:
            self.modules[name] = nn.Module()
            self.modules[name].register_buffer(SHIFT, torch.zeros(self.out_dims[name]))
        return self.modules[name]

    def layout(self, names: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """What `PackedExchange.prepare` gathers from every rank: (W, names, 2) stored ranges, (W, names)
        ranged moments; every group has the same subnet shapes (equal κ)."""
        topo = self.topo
        spans = torch.tensor(
            [
                [
                    even_range(self.shapes[n].numel(), topo.ranks_per_group, r)
                    if is_statistic(n)
                    else self.shard_range(self.shapes[n], r)
                    for n in names
                ]
                for r in range(topo.ranks_per_group)
            ]
        )
        ranged = torch.tensor([not is_statistic(n) for n in names]).expand(topo.world_size, -1)
        return spans.repeat(topo.groups, 1, 1), ranged


class Stopwatch:
    """CPU seconds inside chosen functions, by category, counting only the outermost timed call."""

    PLAN = {  # every split, offset and range of a bucket, for all W ranks and G groups
        packed_plan.PackedPlan: ("_holders", "_targets", "_ranges", "_my_range", "_output_rows", "_per_rank", "plan"),
        held.HeldGroups: ("before",),
    }
    OFFSETS = {held.HeldGroups: ("piece_rows",)}  # per row of a piece: where each held one lands
    OFFSETS_FUNCTIONS = ((runs, "expand_ranges"), (packed, "expand_ranges"))

    def __init__(self) -> None:
        self.seconds = {"plan": 0.0, "offsets": 0.0}
        self.depth = 0

    def timed(self, function, category: str):  # noqa: ANN001, ANN201
        def run(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
            if self.depth:
                return function(*args, **kwargs)
            self.depth += 1
            start = time.process_time()
            try:
                return function(*args, **kwargs)
            finally:
                self.seconds[category] += time.process_time() - start
                self.depth -= 1

        return run

    @contextlib.contextmanager
    def installed(self):  # noqa: ANN201
        patched = [(owner, name, "plan") for owner, names in self.PLAN.items() for name in names]
        patched += [(owner, name, "offsets") for owner, names in self.OFFSETS.items() for name in names]
        patched += [(module, name, "offsets") for module, name in self.OFFSETS_FUNCTIONS]
        originals = [(owner, name, owner.__dict__[name]) for owner, name, _ in patched]
        for owner, name, category in patched:
            setattr(owner, name, self.timed(owner.__dict__[name], category))
        try:
            yield self
        finally:
            for owner, name, original in originals:
                setattr(owner, name, original)


def subnet_shapes(central: CentralShards, unit_blocks: list[UnitBlock], spec: SubnetSpec) -> dict[str, torch.Size]:
    axes = axis_of(unit_blocks)
    out = {}
    for name, shape in central.shapes.items():
        shape = list(shape)
        if name in axes:
            block, axis = axes[name]
            shape[axis.axis] = len(axis.index(spec.units(block)))
        out[name] = torch.Size(shape)
    return out


class StubLayoutExchange(PackedExchange):
    """The packed exchange with the layout every rank's storage would report (a fake group gathers nothing)."""

    def __init__(self, central: CentralShards, storage: FsdpLikeStorage) -> None:
        super().__init__(central, "fp32", storage.shard_range)
        self.storage = storage

    def prepare(self, entries: list, source: object) -> None:
        names = list(dict.fromkeys(e.name for e in entries))
        self.columns = {name: i for i, name in enumerate(names)}
        self.stored, self.ranged = self.storage.layout(names)


def measure(
    central: CentralShards,
    unit_blocks: list[UnitBlock],
    specs: list[SubnetSpec],
    topo: Topology,
    kappas: tuple[float, ...],
    seed: int,
) -> dict[str, float]:
    """One round of the new exchange on this rank, then the previous one on a sample of its buckets."""
    spec = specs[topo.group]
    shapes = subnet_shapes(central, unit_blocks, spec)
    out_dims = {b.output_module: central.shapes[b.output_axis.name][1 - b.output_input_axis] for b in unit_blocks}
    storage = FsdpLikeStorage(shapes, out_dims, topo)
    out: dict[str, float] = {}
    for correction in ("none", "mean"):
        exchange = StubLayoutExchange(central, storage)
        sync = SubnetSync(central, storage, unit_blocks, topo, MOMENTS, correction_of(correction), False, exchange)
        with Stopwatch().installed() as stopwatch:
            start = time.process_time()
            sync.aggregate(specs)
            aggregate_s = time.process_time() - start
            aggregated = sync.take_traffic()
            start = time.process_time()
            sync.dispatch(specs)
            dispatch_s = time.process_time() - start
            dispatched = sync.take_traffic()
        out[f"plan_cpu_s_{correction}"] = stopwatch.seconds["plan"]
        out[f"offsets_cpu_s_{correction}"] = stopwatch.seconds["offsets"]
        out |= {
            f"aggregate_cpu_s_{correction}": aggregate_s,
            f"dispatch_cpu_s_{correction}": dispatch_s,
            f"aggregate_mb_{correction}": aggregated.bytes / 1e6,
            f"dispatch_mb_{correction}": dispatched.bytes / 1e6,
            f"collectives_{correction}": aggregated.collectives + dispatched.collectives,
        }
    out["exchange_metadata_mb"] = (exchange.stored.nbytes + exchange.ranged.nbytes) / 1e6
    drawn = sum(masks.nbytes for masks in (specs[0].drawn or {}).values())  # shared by the G specs
    out["specs_mb"] = (sum(ids.nbytes for s in specs for ids in s.kept.values()) + drawn) / 1e6
    out["model_fp32_mb"] = sum(s.numel() for s in central.shapes.values()) * 4 / 1e6
    out |= measure_previous(central, unit_blocks, specs, topo, storage, exchange, kappas, seed)
    return out


def _previous_modules() -> object:
    """The previous release's `packing` module, from git, beside its `exchange_plan` and `subnet`."""
    directory = Path(tempfile.mkdtemp())
    for module in ("exchange_plan", "packing", "subnet"):
        show = ["git", "show", f"{PREVIOUS}:twist_scale/{module}.py"]
        text = subprocess.run(show, cwd=REPO, check=True, capture_output=True, text=True).stdout
        text = text.replace("from twist_scale.exchange_plan import", "from previous_exchange_plan import")
        (directory / f"previous_{module}.py").write_text(text)
    sys.path.insert(0, str(directory))
    import previous_packing
    import previous_subnet  # noqa: F401 - found in sys.modules by its caller

    return previous_packing


def measure_previous(
    central: CentralShards,
    unit_blocks: list[UnitBlock],
    specs: list[SubnetSpec],
    topo: Topology,
    storage: FsdpLikeStorage,
    new: StubLayoutExchange,
    kappas: tuple[float, ...],
    seed: int,
) -> dict[str, float]:
    """The previous exchange (correction `mean`: output projections dispatched whole) on evenly spread
    buckets of its own plan, per bucket CPU s times its bucket count; and its exact dispatch bytes for
    the output projections it sent whole."""
    previous = _previous_modules()
    entry_type = sys.modules["previous_exchange_plan"].Entry
    start = time.process_time()
    sys.modules["previous_subnet"].SubnetSampler(tuple(unit_blocks), kappas, seed).specs(0)  # Python's draw
    sampling_s = time.process_time() - start
    axes = axis_of(unit_blocks)
    entries = []
    for name, shape in central.shapes.items():
        unit = axes.get(name)
        output = unit is not None and name == unit[0].output_axis.name
        entries.append(entry_type(name, shape, unit, is_statistic(name) or output))
        if not is_statistic(name):
            entries += [entry_type(f"{name}@{key}", shape, unit) for key in MOMENTS]
    exchange = previous.PackedExchange(central, "fp32", storage.shard_range)
    exchange.layout = {n: new.stored[:, c].tolist() for n, c in new.columns.items()}
    exchange.ranged_state = {n: new.ranged[:, c].tolist() for n, c in new.columns.items()}
    plan = exchange.plan(entries, 32 * 2**20)
    picks = sorted({round(i * (len(plan) - 1) / (SAMPLED_BUCKETS - 1)) for i in range(SAMPLED_BUCKETS)})

    def read(entry) -> tuple[int, torch.Tensor]:  # noqa: ANN001
        name = entry.name.partition("@")[0]
        start, stop = exchange.layout[name][topo.rank]
        return start, torch.zeros(stop - start)

    out = {"previous_buckets": len(plan), "previous_sampled_buckets": len(picks), "previous_sampling_cpu_s": sampling_s}
    for phase in ("aggregate", "dispatch"):
        start = time.process_time()
        for i in picks:
            if phase == "aggregate":
                exchange.aggregate(plan[i], read, specs)
            else:
                exchange.dispatch(plan[i], specs)
        out[f"previous_{phase}_cpu_s"] = (time.process_time() - start) / len(picks) * len(plan)
    out["previous_metadata_mb"] = _python_list_bytes(exchange.layout) + _python_list_bytes(exchange.ranged_state)
    whole = [e for e in entries if e.whole and not is_statistic(e.name)]  # sent full-width to every rank
    out["previous_dispatch_whole_outputs_mb"] = sum(e.numel for e in whole) * 4 / 1e6
    return out


def _python_list_bytes(table: dict[str, list]) -> float:
    """What Python's lists of lists (of ints or bools) in `table` hold, in MB."""
    total = 0
    for rows in table.values():
        total += sys.getsizeof(rows)
        for row in rows:
            total += sys.getsizeof(row) + (sum(sys.getsizeof(v) for v in row) if isinstance(row, list) else 0)
    return total / 1e6
