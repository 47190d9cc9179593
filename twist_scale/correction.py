"""Activation-shift correction for blocks that run with a fraction kappa of their units.

Hooks sit on each partitioned block's output projection (o_proj / down_proj / c_proj):
- 'scale': the projection's input is multiplied by 1/kappa (inverted-dropout style), so the
  block's contribution to the residual keeps its full-width scale; export folds it into the weight.
  The factor is a Python float, not a buffer: a bf16 engine casts buffers, which would round 4/3 to
  1.3359, while a float multiplies at the op's fp32 precision — the factor export folds.
- 'mean': running means of each unit channel's activation are kept while training (no
  calibration pass), and the dropped units' expected contribution W_dropped @ E[a_dropped] is
  added as a bias; export folds it into the projection's bias. A running mean of the squares is
  kept beside it, so the central model also knows each channel's variance: what an adaptive
  zero-cost export ranks units by, again without a calibration pass.
- 'none': no hooks.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from twist_scale.models import AxisSlice, UnitGroup
from twist_scale.subnet import SubnetSpec, keep_ratio

ACT_MEAN = "twist_act_mean"
ACT_SQ_MEAN = "twist_act_sq_mean"
STATISTICS = (ACT_MEAN, ACT_SQ_MEAN)  # per unit channel: sliced, scattered and averaged like weights


def is_statistic(name: str) -> bool:
    return name.rpartition(".")[2] in STATISTICS


def with_stat_axes(unit_groups: list[UnitGroup], mode: str) -> list[UnitGroup]:
    """Under 'mean' the activation statistics are unit tensors too: sliced, scattered and averaged."""
    if mode != "mean":
        return unit_groups
    return [
        dataclasses.replace(
            ug,
            axes=(*ug.axes, *(AxisSlice(f"{ug.output_module}.{s}", 0, ug.output_axis.width) for s in STATISTICS)),
        )
        for ug in unit_groups
    ]


def _in_features(module: nn.Module, input_axis: int) -> int:
    return module.weight.shape[input_axis]


def _out_features(module: nn.Module, input_axis: int) -> int:
    return module.weight.shape[1 - input_axis]


def install_correction(model: nn.Module, unit_groups: list[UnitGroup], mode: str, momentum: float) -> None:
    """Register buffers and hooks on the full-width model, before it is shrunk or wrapped."""
    if mode == "none":
        return
    for ug in unit_groups:
        module = model.get_submodule(ug.output_module)
        module.twist_input_scale = 1.0
        if mode == "mean":
            for stat in STATISTICS:
                module.register_buffer(stat, torch.zeros(_in_features(module, ug.output_input_axis)))
            module.register_buffer(
                "twist_shift", torch.zeros(_out_features(module, ug.output_input_axis)), persistent=False
            )
            module.twist_momentum = momentum
        module.register_forward_pre_hook(_pre_hook)
        if mode == "mean":
            module.register_forward_hook(_post_hook)


def _pre_hook(module: nn.Module, args: tuple) -> tuple:
    x = args[0]  # (B, T, unit channels of the kept units)
    if module.training and hasattr(module, ACT_MEAN):
        with torch.no_grad():
            flat = x.detach().float().reshape(-1, x.shape[-1])
            for stat, batch in ((ACT_MEAN, flat.mean(0)), (ACT_SQ_MEAN, (flat**2).mean(0))):
                getattr(module, stat).mul_(module.twist_momentum).add_(batch, alpha=1 - module.twist_momentum)
    return (x * module.twist_input_scale, *args[1:])


def _post_hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
    return output + module.twist_shift.to(output.dtype)


def dropped_contribution(
    full_weight: torch.Tensor, full_mean: torch.Tensor, ug: UnitGroup, kept: torch.Tensor
) -> torch.Tensor:
    """W[:, dropped] @ E[a_dropped]: what the dropped units add to the residual on average."""
    keep = torch.ones(ug.num_units, dtype=torch.bool)
    keep[kept] = False
    dropped = keep.nonzero().flatten()
    if dropped.numel() == 0:
        return full_weight.new_zeros(full_weight.shape[1 - ug.output_input_axis])
    idx = ug.output_axis.index(dropped)
    w = full_weight.index_select(ug.output_input_axis, idx)
    mu = full_mean[idx].to(w.dtype)
    return w @ mu if ug.output_input_axis == 1 else mu @ w


@torch.no_grad()
def set_scale(model: nn.Module, unit_groups: list[UnitGroup], spec: SubnetSpec, mode: str) -> None:
    if mode != "scale":
        return
    for ug in unit_groups:
        model.get_submodule(ug.output_module).twist_input_scale = 1.0 / keep_ratio(spec, ug)


@torch.no_grad()
def set_shift(model: nn.Module, ug: UnitGroup, shift: torch.Tensor) -> None:
    model.get_submodule(ug.output_module).twist_shift.copy_(shift)


def keep_statistics_fp32(model: nn.Module) -> None:
    """Undo a bf16 engine's cast of the correction buffers: running means accumulate in fp32.

    A 0.99-momentum mean in bf16 (8 mantissa bits) stalls once updates fall below its rounding step.
    """
    for module in model.modules():
        for name in (*STATISTICS, "twist_shift"):
            buf = module._buffers.get(name)
            if buf is not None and buf.dtype != torch.float32:
                module._buffers[name] = buf.float()
