"""Run on W ranks by `helpers.dist.run_on_ranks`: dispatch and aggregation vs the holder-mean formula.

For each case (G, ZeRO stage, disjoint / overlapping / uncovered subnets, exchange): dispatch the
central model, let each group's engine hold known new values, aggregate, and compare every central
tensor with a single-process reference computed from masks. Exchanges: 'dense' (masked
reduce-scatter), 'packed' (held elements only, fp32 on the wire; under ZeRO-3 each rank receives only
its shard), 'whole' (packed, every rank receiving whole subnet tensors), 'bf16' (packed, bf16 on the
wire), 'parts' (packed with 4 kB buckets: most tensors are cut into parts, as a 70B model's embedding is).
"""

from __future__ import annotations

import zlib
from collections.abc import Callable

import torch
from helpers import REPO

from twist_scale.central import CentralShards
from twist_scale.config import RunConfig
from twist_scale.correction import ACT_MEAN, ACT_SQ_MEAN, SHIFT, correction_of, dropped_contribution
from twist_scale.engines.deepspeed_engine import DeepSpeedEngine
from twist_scale.models import AxisSlice, UnitBlock, architecture_of, build_model
from twist_scale.exchange import FullWidthExchange, PackedExchange
from twist_scale.subnet import SubnetSampler, SubnetSpec, apply_subnet_shapes, axis_of, partitioned_blocks, slice_tensor, unit_mask
from twist_scale.assembly import central_tensors
from twist_scale.sync import SubnetSync
from twist_scale.topology import Topology


def delta(name: str, group: int, shape: torch.Size) -> torch.Tensor:
    """What group `group` 'learned' for tensor `name`: known to every rank, so the reference can redo it."""
    g = torch.Generator().manual_seed(zlib.crc32(f"{name}:{group}".encode()))
    return torch.randn(shape, generator=g) * 0.1


EXCHANGES = {  # name: (exchange of the central model and the engine, bucket MB)
    "dense": (lambda central, engine: FullWidthExchange(central), 32),
    "packed": (lambda central, engine: PackedExchange(central, "fp32", engine.shard_range), 32),
    "whole": (lambda central, engine: PackedExchange(central), 32),
    "bf16": (lambda central, engine: PackedExchange(central, "bf16", engine.shard_range), 32),
    "parts": (lambda central, engine: PackedExchange(central, "fp32", engine.shard_range), 4 / 1024),
}


Axes = dict[str, tuple[UnitBlock, AxisSlice]]  # tensor name -> its unit block and unit axis (subnet.axis_of)


def subnet_of(full: torch.Tensor, name: str, axes: Axes, spec: SubnetSpec) -> torch.Tensor:
    """The slice of a full tensor that a group with `spec` trains."""
    return full if name not in axes else slice_tensor(full, axes[name][1], spec.units(axes[name][0]))


def holder_mean(
    name: str, axes: Axes, specs: list[SubnetSpec], value: Callable[[int], torch.Tensor], unheld: torch.Tensor
) -> torch.Tensor:
    """The reference formula from masks: the mean of `value(g)` over the groups g holding each element,
    `unheld` where no group does."""
    shape = unheld.shape
    total, count = torch.zeros(shape), torch.zeros(shape)
    for g, s in enumerate(specs):
        mask = torch.ones(shape) if name not in axes else unit_mask(shape, axes[name][1], s.units(axes[name][0]))
        total += mask * value(g)
        count += mask
    return torch.where(count > 0, total / count.clamp(min=1), unheld)


def run_case(groups: int, stage: int, kappas: tuple[float, ...]) -> dict[str, tuple[float, float, list[tuple[int, int]]]]:
    """Per exchange: (max |error|, max |expected|, (bytes, collectives) of dispatch and of aggregation)."""
    topo = Topology.from_dist(groups)
    torch.manual_seed(0)
    model = build_model("llama", "tiny", 64)  # 6 layers, GQA
    unit_blocks = partitioned_blocks(architecture_of(model).unit_blocks(model.config), shared_layers=[0, 5])
    initial = {n: t.detach().clone() for n, t in central_tensors(model).items()}
    specs = SubnetSampler(tuple(unit_blocks), kappas, seed=11).specs(0)
    spec = specs[topo.group]
    apply_subnet_shapes(model, unit_blocks, spec)
    cfg = RunConfig()
    cfg.parallel.ds_config = str(REPO / "ds_configs" / f"zero{stage}.json")
    cfg.optim.name, cfg.data.micro_batch_size = "sgd", 1
    engine = DeepSpeedEngine(model, cfg, topo)  # one engine for every exchange: dispatch resets its weights
    axes = axis_of(unit_blocks)

    def sub_of(full: torch.Tensor, name: str) -> torch.Tensor:
        return subnet_of(full, name, axes, spec)

    results = {}
    for exchange, (build, bucket_mb) in EXCHANGES.items():
        central = CentralShards(topo, {n: t.shape for n, t in initial.items()})
        for n, t in initial.items():
            central.set_full(n, t)
        sync = SubnetSync(
            central, engine, unit_blocks, topo, (), correction_of("none"), False, build(central, engine), bucket_mb
        )
        sync.dispatch(specs)
        traffic = [sync.take_traffic()]
        for name, full in initial.items():  # dispatch delivered exactly the spec's slice; then "train"
            assert torch.equal(engine.read(name), sub_of(full, name)), f"{exchange}: dispatch mismatch in {name}"
            engine.write(name, sub_of(full + delta(name, topo.group, full.shape), name))
        sync.aggregate(specs)
        traffic.append(sync.take_traffic())

        worst = largest = 0.0
        for name, full in initial.items():
            expected = holder_mean(name, axes, specs, lambda g: full + delta(name, g, full.shape), full)
            gathered = central.gather(name)
            worst = max(worst, (gathered - expected).abs().max().item())
            largest = max(largest, expected.abs().max().item())
            at_root = central.gather(name, dst=0)  # what an export writes: on rank 0 alone
            assert torch.equal(at_root, gathered) if topo.rank == 0 else at_root is None
        results[exchange] = worst, largest, [(t.bytes, t.collectives) for t in traffic]
    results["subnet_elements"] = sum(sub_of(full, name).numel() for name, full in initial.items())
    return results


KAPPAS = {  # each group's kappa; 'mixed' is a sandwich: group 0 full width, group g keeps 1/(g+1)
    "disjoint": lambda groups: (1 / groups,) * groups,
    "overlapping": lambda groups: (0.75,) * groups,
    "uncovered": lambda groups: (0.2,) * groups,
    "mixed": lambda groups: tuple(1 / (g + 1) for g in range(groups)),
}


def check_cases(rank: int, world: int, cases: list[str]) -> None:
    """cases: 'G:stage:kind', e.g. '2:3:overlapping', each run with every exchange."""
    for case in cases:
        groups, stage, label = int(case.split(":")[0]), int(case.split(":")[1]), case.split(":")[2]
        kappas = KAPPAS[label](groups)
        drops_units = kappas[rank // (world // groups)] < 1  # this rank's group trains a strict subnet
        traffic = {}
        results = run_case(groups, stage, kappas)
        subnet_elements = results.pop("subnet_elements")
        for exchange, (err, largest, traffic[exchange]) in results.items():
            where = f"G={groups} R={world // groups} zero={stage} {label} {exchange}"
            bound = 2**-8 * largest if exchange == "bf16" else 1e-6  # bf16 keeps 8 significant bits
            assert err <= bound, f"{where}: max|err|={err:.3e} > {bound:.1e}"
        (dense_dispatch, dense_agg), (packed_dispatch, packed_agg) = traffic["dense"], traffic["packed"]
        # the tiny model fits one default bucket: one all-to-all per phase instead of one collective per tensor
        assert packed_dispatch[1] == packed_agg[1] == 1, f"{case}: packed collectives {packed_dispatch, packed_agg}"
        assert dense_agg[1] > 10, f"{case}: dense aggregation issued {dense_agg[1]} collectives"
        # only held elements travel: strictly less than the dense exchange whenever the group drops units
        assert packed_dispatch[0] < dense_dispatch[0] or not drops_units, f"{case}: {traffic}"
        assert packed_dispatch[0] <= dense_dispatch[0], f"{case}: {traffic}"
        # each rank sends only the part of its group's subnet its engine stores: 1/R of it (ZeRO pads a little).
        # The dense exchange hides a gather of the whole subnet inside the engine's read; it counts the rest.
        ranks_per_group = world // groups
        assert packed_agg[0] <= 4 * (1.02 * subnet_elements / ranks_per_group + 64), f"{case}: {traffic}"
        assert ranks_per_group > 1 or not drops_units or packed_agg[0] < dense_agg[0], f"{case}: {traffic}"
        assert traffic["bf16"][1][0] * 2 == packed_agg[0], f"{case}: bf16 halves the aggregation payload"
        whole_dispatch, whole_agg = traffic["whole"]  # ZeRO-3 shards: each of R ranks receives only its 1/R
        shards = stage == 3 and world > groups
        assert whole_agg == packed_agg and (whole_dispatch[0] > packed_dispatch[0]) == shards, f"{case}: {traffic}"
        parts_dispatch, parts_agg = traffic["parts"]  # the same elements travel, in many more collectives
        assert (parts_dispatch[0], parts_agg[0]) == (packed_dispatch[0], packed_agg[0]), f"{case}: {traffic}"
        assert parts_agg[1] > 10 * packed_agg[1], f"{case}: 4 kB buckets issued only {parts_agg[1]} collectives"


MOMENTS = ("exp_avg", "exp_avg_sq")


def check_moment_dispatch(rank: int, world: int, stages: list[int]) -> None:
    """Adam moments aggregate to the holder mean and dispatch back exactly, each rank receiving only the
    range its engine stores (ZeRO-2: its fragment of the fp32 partition; ZeRO-3: its partition)."""
    groups = 2
    for stage in stages:
        topo = Topology.from_dist(groups)
        torch.manual_seed(0)
        model = build_model("llama", "tiny", 64)
        unit_blocks = partitioned_blocks(architecture_of(model).unit_blocks(model.config), shared_layers=[0, 5])
        shapes = {n: t.shape for n, t in central_tensors(model).items()}
        initial = {n: t.detach().clone() for n, t in central_tensors(model).items()}
        specs = SubnetSampler(tuple(unit_blocks), (0.5, 0.5), seed=11).specs(0)
        apply_subnet_shapes(model, unit_blocks, specs[topo.group])
        cfg = RunConfig()
        cfg.parallel.ds_config = str(REPO / "ds_configs" / f"zero{stage}.json")
        cfg.data.micro_batch_size = 1
        engine = DeepSpeedEngine(model, cfg, topo)
        engine.train_step([torch.randint(0, 64, (1, 16))])  # DeepSpeed creates the moments at the first step
        central = CentralShards(topo, shapes)
        for n, t in initial.items():
            central.set_full(n, t)
        exchange = PackedExchange(central, "fp32", engine.shard_range)
        sync = SubnetSync(central, engine, unit_blocks, topo, MOMENTS, correction_of("none"), False, exchange)
        axes = axis_of(unit_blocks)

        def sub_of(full: torch.Tensor, name: str) -> torch.Tensor:
            return subnet_of(full, name, axes, specs[topo.group])

        def moment(name: str, key: str, group: int) -> torch.Tensor:
            return delta(f"{name}@{key}", group, shapes[name]).abs()  # exp_avg_sq must stay >= 0

        sync.dispatch(specs)  # no central moments yet: weights only
        for name in engine.params:
            for key in MOMENTS:
                engine.write_state(name, key, sub_of(moment(name, key, topo.group), name))
        sync.aggregate(specs)
        sync.take_traffic()
        for name in engine.params:  # overwrite, so only dispatch can restore them
            for key in MOMENTS:
                engine.write_state(name, key, torch.full_like(sub_of(moment(name, key, 0), name), 7.0))
        sync.dispatch(specs)
        received = sync.take_traffic().bytes
        where = f"G=2 R={topo.ranks_per_group} zero={stage}"
        subnet = 0
        for name in engine.params:
            subnet += sub_of(initial[name], name).numel()
            for key in MOMENTS:  # moments nobody held stay at zero, where central moments start
                expected = holder_mean(name, axes, specs, lambda g: moment(name, key, g), torch.zeros(shapes[name]))
                got = engine.read_state(name, key)
                assert (got - sub_of(expected, name)).abs().max() <= 1e-6, f"{where}: {name}@{key} after dispatch"
        # ZeRO-2 keeps whole working weights on every rank but only a fragment of each moment: 1 + 2/R
        # subnets, not 3 (moments sent whole); ZeRO-3 shards all three: 3/R
        R = topo.ranks_per_group
        share = (1 + len(MOMENTS)) / R if stage == 3 else 1 + len(MOMENTS) / R
        assert received <= 4 * share * subnet * 1.02 + 4096, f"{where}: dispatch received {received} bytes"
        del engine, sync


def check_shifts(rank: int, world: int, stages: list[int]) -> None:
    """Correction `mean`: the shift each group's output projections receive, W[:, dropped] @ E[a_dropped],
    equals the formula on the full central weights whether the owners compute it on their pieces (packed,
    also with 4 kB buckets) or every rank gathers the weight whole (dense); the packed dispatch no longer
    sends output projections whole, so its bytes are what correction 'none' dispatches plus the statistics."""
    groups = 2
    for stage in stages:
        topo = Topology.from_dist(groups)
        torch.manual_seed(0)
        model = build_model("llama", "tiny", 64)
        correction = correction_of("mean")
        unit_blocks = correction.unit_blocks(
            partitioned_blocks(architecture_of(model).unit_blocks(model.config), shared_layers=[0, 5])
        )
        correction.install(model, unit_blocks, 0.9)
        with torch.no_grad():
            for name, buffer in model.named_buffers():
                if name.endswith(ACT_MEAN):
                    buffer.normal_()
        initial = {n: t.detach().clone() for n, t in central_tensors(model).items()}
        specs = SubnetSampler(tuple(unit_blocks), (0.5, 0.5), seed=11).specs(0)
        spec = specs[topo.group]
        apply_subnet_shapes(model, unit_blocks, spec)
        cfg = RunConfig()
        cfg.parallel.ds_config = str(REPO / "ds_configs" / f"zero{stage}.json")
        cfg.optim.name, cfg.data.micro_batch_size = "sgd", 1
        engine = DeepSpeedEngine(model, cfg, topo)
        received = {}
        for exchange, (build, bucket_mb) in EXCHANGES.items():
            for strategy in ("mean", "none"):
                central = CentralShards(topo, {n: t.shape for n, t in initial.items()})
                for n, t in initial.items():
                    central.set_full(n, t)
                sync = SubnetSync(
                    central, engine, unit_blocks, topo, (), correction_of(strategy), False, build(central, engine), bucket_mb
                )
                sync.dispatch(specs)
                received[exchange, strategy] = sync.take_traffic().bytes
                if strategy == "none":
                    continue
                for block in unit_blocks:
                    mean = initial[f"{block.output_module}.{ACT_MEAN}"]
                    expected = dropped_contribution(initial[block.output_axis.name], mean, block, spec.units(block))
                    got = engine.submodule(block.output_module).get_buffer(SHIFT)
                    where = f"zero={stage} {exchange} {block.output_module}"
                    assert (got - expected).abs().max() <= 1e-5 * expected.abs().max(), where
        statistics = sum(t.numel() for n, t in initial.items() if n.endswith((ACT_MEAN, ACT_SQ_MEAN)))
        shifts = sum(initial[b.output_axis.name].shape[0] for b in unit_blocks)
        bound = received["packed", "none"] + 4 * (2 * shifts + 64)  # + one output vector per block (+ overlaps)
        assert received["packed", "mean"] <= bound, f"zero={stage}: {received}, {statistics} statistics"
        assert received["dense", "mean"] > received["dense", "none"], f"zero={stage}: the reference gathers weights"
        del engine
