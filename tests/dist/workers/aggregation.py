"""Run on W ranks by `helpers.dist.run_on_ranks`: masked reduce-scatter vs the holder-mean formula.

For each case (G, ZeRO stage, disjoint / overlapping / uncovered subnets): dispatch the central
model, let each group's engine hold known new values, aggregate, and compare every central
tensor with a single-process reference computed from masks.
"""

from __future__ import annotations

import zlib

import torch
from helpers import REPO

from twist_scale.aggregate import CentralShards
from twist_scale.config import RunConfig
from twist_scale.correction import correction_of
from twist_scale.engines.deepspeed_engine import DeepSpeedEngine
from twist_scale.models import architecture_of, build_model
from twist_scale.subnet import SubnetSampler, apply_subnet_shapes, axis_of, partitioned_blocks, slice_tensor, unit_mask
from twist_scale.sync import SubnetSync, central_tensors
from twist_scale.topology import Topology


def delta(name: str, group: int, shape: torch.Size) -> torch.Tensor:
    """What group `group` 'learned' for tensor `name`: known to every rank, so the reference can redo it."""
    g = torch.Generator().manual_seed(zlib.crc32(f"{name}:{group}".encode()))
    return torch.randn(shape, generator=g) * 0.1


def run_case(groups: int, stage: int, kappa: float) -> float:
    topo = Topology.from_dist(groups)
    torch.manual_seed(0)
    model = build_model("llama", "tiny", 64)  # 6 layers, GQA
    ugs = partitioned_blocks(architecture_of(model).unit_blocks(model.config), shared_layers=[0, 5])
    tensors = central_tensors(model)
    initial = {n: t.detach().clone() for n, t in tensors.items()}
    central = CentralShards(topo, {n: t.shape for n, t in initial.items()})
    for n, t in initial.items():
        central.set_full(n, t)
    specs = SubnetSampler(tuple(ugs), groups, kappa, seed=11).specs(0)
    spec = specs[topo.group]
    apply_subnet_shapes(model, ugs, spec)
    cfg = RunConfig()
    cfg.parallel.ds_config = str(REPO / "ds_configs" / f"zero{stage}.json")
    cfg.optim.name, cfg.data.micro_batch_size = "sgd", 1
    engine = DeepSpeedEngine(model, cfg, topo)
    sync = SubnetSync(central, engine, ugs, topo, (), correction_of("none"), reset_moments=False)
    sync.dispatch(spec)
    axes = axis_of(ugs)

    def sub_of(full: torch.Tensor, name: str) -> torch.Tensor:
        return full if name not in axes else slice_tensor(full, axes[name][1], spec.units(axes[name][0]))

    for name, full in initial.items():  # dispatch delivered exactly the spec's slice; then "train"
        assert torch.equal(engine.read(name), sub_of(full, name)), f"dispatch mismatch in {name}"
        engine.write(name, sub_of(full + delta(name, topo.group, full.shape), name))
    sync.aggregate(specs)

    worst = 0.0
    for name, full in initial.items():
        total, count = torch.zeros_like(full), torch.zeros_like(full)
        for g, s in enumerate(specs):
            mask = (
                torch.ones_like(full)
                if name not in axes
                else unit_mask(full.shape, axes[name][1], s.units(axes[name][0]))
            )
            total += mask * (full + delta(name, g, full.shape))
            count += mask
        expected = torch.where(count > 0, total / count.clamp(min=1), full)
        worst = max(worst, (central.gather(name) - expected).abs().max().item())
    return worst


KAPPAS = {"disjoint": lambda groups: 1 / groups, "overlapping": lambda groups: 0.75, "uncovered": lambda groups: 0.2}


def check_cases(rank: int, world: int, cases: list[str]) -> None:
    """cases: 'G:stage:kind', e.g. '2:3:overlapping'."""
    for case in cases:
        groups, stage, label = int(case.split(":")[0]), int(case.split(":")[1]), case.split(":")[2]
        err = run_case(groups, stage, KAPPAS[label](groups))
        assert err <= 1e-6, f"G={groups} R={world // groups} zero={stage} {label}: max|err|={err:.3e}"
