"""Activation-shift correction for blocks that run with a fraction kappa of their units.

One strategy per kind, each saying what it does in the three phases that see it: `install` on the
full-width model before training, `dispatch` whenever a group receives its subnet, and `fold` when a
subnet is exported as a smaller dense model. Hooks sit on each partitioned block's output projection
(o_proj / down_proj / c_proj):

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

from twist_scale.models import AxisSlice, UnitBlock

ACT_MEAN = "twist_act_mean"
ACT_SQ_MEAN = "twist_act_sq_mean"
STATISTICS = (ACT_MEAN, ACT_SQ_MEAN)  # per unit channel: sliced, scattered and averaged like weights
SHIFT = "twist_shift"


def is_statistic(name: str) -> bool:
    return name.rpartition(".")[2] in STATISTICS


class Correction:
    """'none': the subnet runs as it is. The base of the other strategies: every phase a no-op."""

    name = "none"
    folds_bias = False  # export adds a bias to the output projection (Llama then gains biases)
    needs_shift = False  # dispatch sets what the dropped units add on average (`dropped_contribution`)

    def unit_blocks(self, unit_blocks: list[UnitBlock]) -> list[UnitBlock]:
        """The unit map training slices and averages: the partitioned unit blocks plus any statistics."""
        return unit_blocks

    def install(self, model: nn.Module, unit_blocks: list[UnitBlock], momentum: float) -> None:
        """Register buffers and hooks on the full-width model, before it is shrunk or wrapped."""

    def dispatch(
        self, module: nn.Module, unit_block: UnitBlock, kept: torch.Tensor, shift: torch.Tensor | None
    ) -> None:
        """Set the group's output projection `module` for a subnet that keeps units `kept`.

        `shift` is `dropped_contribution` of the central model as dispatched (only where `needs_shift`):
        the exchange computes it where the weights are, so no rank needs the full projection.
        """

    def fold(
        self, module: nn.Module, unit_block: UnitBlock, kept: torch.Tensor, means: dict[str, torch.Tensor]
    ) -> None:
        """Bake what `dispatch` set into the full-width projection, before its dropped units are sliced away."""


class ScaleCorrection(Correction):
    name = "scale"

    def install(self, model: nn.Module, unit_blocks: list[UnitBlock], momentum: float) -> None:
        for unit_block in unit_blocks:
            module = model.get_submodule(unit_block.output_module)
            module.twist_input_scale = 1.0
            module.register_forward_pre_hook(_scale_input)

    def dispatch(
        self, module: nn.Module, unit_block: UnitBlock, kept: torch.Tensor, shift: torch.Tensor | None
    ) -> None:
        module.twist_input_scale = unit_block.num_units / len(kept)

    @torch.no_grad()
    def fold(
        self, module: nn.Module, unit_block: UnitBlock, kept: torch.Tensor, means: dict[str, torch.Tensor]
    ) -> None:
        module.weight.mul_(
            unit_block.num_units / len(kept)
        )  # dropped channels are sliced away, so scaling all is the same


class MeanCorrection(Correction):
    name = "mean"
    folds_bias = True
    needs_shift = True

    def unit_blocks(self, unit_blocks: list[UnitBlock]) -> list[UnitBlock]:
        return [
            dataclasses.replace(
                unit_block,
                axes=(
                    *unit_block.axes,
                    *(
                        AxisSlice(f"{unit_block.output_module}.{s}", 0, unit_block.output_axis.unit_width)
                        for s in STATISTICS
                    ),
                ),
            )
            for unit_block in unit_blocks
        ]

    def install(self, model: nn.Module, unit_blocks: list[UnitBlock], momentum: float) -> None:
        for unit_block in unit_blocks:
            module = model.get_submodule(unit_block.output_module)
            for stat in STATISTICS:
                module.register_buffer(stat, torch.zeros(module.weight.shape[unit_block.output_input_axis]))
            module.register_buffer(
                SHIFT, torch.zeros(module.weight.shape[1 - unit_block.output_input_axis]), persistent=False
            )
            module.twist_momentum = momentum
            module.register_forward_pre_hook(_track_statistics)
            module.register_forward_hook(_add_shift)

    @torch.no_grad()
    def dispatch(
        self, module: nn.Module, unit_block: UnitBlock, kept: torch.Tensor, shift: torch.Tensor | None
    ) -> None:
        module.get_buffer(SHIFT).copy_(shift)

    @torch.no_grad()
    def fold(
        self, module: nn.Module, unit_block: UnitBlock, kept: torch.Tensor, means: dict[str, torch.Tensor]
    ) -> None:
        if unit_block.output_module not in means:
            raise ValueError(
                f"no activation means for {unit_block.output_module}: correction 'mean' needs them. The layer was "
                "probably kept whole in training; export with the training's shared layers (--shared_layers auto) or "
                "pass --correction none/scale"
            )
        shift = dropped_contribution(module.weight, means[unit_block.output_module], unit_block, kept)
        module.bias.add_(shift.to(module.bias.dtype))


CORRECTIONS: dict[str, Correction] = {c.name: c for c in (Correction(), ScaleCorrection(), MeanCorrection())}


def correction_of(name: str) -> Correction:
    if name not in CORRECTIONS:
        raise ValueError(f"--correction {name!r} is not allowed; choose one of {', '.join(CORRECTIONS)}")
    return CORRECTIONS[name]


def _scale_input(module: nn.Module, args: tuple) -> tuple:
    return (args[0] * module.twist_input_scale, *args[1:])


def _track_statistics(module: nn.Module, args: tuple) -> None:
    if module.training:
        with torch.no_grad():
            flat = args[0].detach().float().reshape(-1, args[0].shape[-1])  # (tokens, channels of the kept units)
            for stat, batch in ((ACT_MEAN, flat.mean(0)), (ACT_SQ_MEAN, (flat**2).mean(0))):
                getattr(module, stat).mul_(module.twist_momentum).add_(batch, alpha=1 - module.twist_momentum)


def _add_shift(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
    return output + module.get_buffer(SHIFT).to(output.dtype)


def dropped_contribution(
    full_weight: torch.Tensor, full_mean: torch.Tensor, unit_block: UnitBlock, kept: torch.Tensor
) -> torch.Tensor:
    """W[:, dropped] @ E[a_dropped]: what the dropped units add to the residual on average."""
    keep = torch.ones(unit_block.num_units, dtype=torch.bool)
    keep[kept] = False
    dropped = keep.nonzero().flatten()
    if dropped.numel() == 0:
        return full_weight.new_zeros(full_weight.shape[1 - unit_block.output_input_axis])
    idx = unit_block.output_axis.index(dropped)
    w = full_weight.index_select(unit_block.output_input_axis, idx)
    mu = full_mean[idx].to(w.dtype)
    return w @ mu if unit_block.output_input_axis == 1 else mu @ w


def keep_statistics_fp32(model: nn.Module) -> None:
    """Undo a bf16 engine's cast of the correction buffers: running means accumulate in fp32.

    A 0.99-momentum mean in bf16 (8 mantissa bits) stalls once updates fall below its rounding step.
    """
    for module in model.modules():
        for name in (*STATISTICS, SHIFT):
            buf = module._buffers.get(name)
            if buf is not None and buf.dtype != torch.float32:
                module._buffers[name] = buf.float()
