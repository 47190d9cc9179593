"""The types every architecture's spec is made of: unit slices, unit blocks and the `Architecture` itself.

A *unit map* says which slices of which tensors form one attention unit (a KV group with its
query heads) or one MLP neuron. Slicing, scattering and aggregation are generic over it: the
model code never learns about subnets, ranks or masks.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from transformers import PretrainedConfig

Widths = dict[int, dict[str, int]]  # layer -> {"attn": units, "mlp": units}


@dataclass(frozen=True)
class AxisSlice:
    """Along `axis` of tensor `name`, unit u owns `width` contiguous channels at u*width.

    A fused tensor (GPT-2's c_attn, Phi-3's qkv_proj and gate_up_proj) stacks several such runs along
    one axis: `segments` lists each run's (offset, width per unit) in the tensor's order, and slicing
    keeps that order, so a sliced fused tensor is still laid out as its module expects.
    """

    name: str
    axis: int
    width: int = 0
    segments: tuple[tuple[int, int], ...] = ()

    @property
    def runs(self) -> tuple[tuple[int, int], ...]:
        return self.segments or ((0, self.width),)

    @property
    def unit_width(self) -> int:
        """Channels one unit owns along the axis, over all segments."""
        return sum(width for _, width in self.runs)

    def index(self, units: torch.Tensor) -> torch.Tensor:
        """The channels `units` own, segment by segment (the sliced tensor's layout)."""
        return torch.cat(
            [(offset + units[:, None] * width + torch.arange(width)).flatten() for offset, width in self.runs]
        )

    def spread(self, per_unit: torch.Tensor) -> torch.Tensor:
        """One value per unit (the last dim) repeated over the unit's channels, in `index` order."""
        return torch.cat([per_unit.repeat_interleave(width, -1) for _, width in self.runs], -1)

    def per_unit(self, channels: torch.Tensor, num_units: int) -> torch.Tensor:
        """Sum a per-channel vector (one entry per channel along the axis) into one value per unit."""
        return sum(
            channels[offset : offset + num_units * width].view(num_units, width).sum(1) for offset, width in self.runs
        )


@dataclass(frozen=True)
class UnitBlock:
    """The units of one kind ('attn' or 'mlp') in one layer, and the tensor slices they own."""

    layer: int
    kind: str
    num_units: int
    axes: tuple[AxisSlice, ...]
    output_module: str  # its output is the block's residual contribution (o_proj / down_proj / c_proj)
    output_input_axis: int  # the axis of output_module.weight indexed by unit channels

    @property
    def key(self) -> tuple[int, str]:
        return self.layer, self.kind

    @property
    def output_axis(self) -> AxisSlice:
        return next(a for a in self.axes if a.name == f"{self.output_module}.weight")


@dataclass(frozen=True)
class Architecture:
    """Everything the code knows about one Hugging Face architecture, keyed by its `model_type`."""

    model_type: str
    presets: dict[str, dict]  # size name -> config fields
    from_preset: Callable[[dict, int], nn.Module]  # (preset fields, vocab size) -> a fresh full-width model
    unit_blocks: Callable[[PretrainedConfig], list[UnitBlock]]
    num_layers: Callable[[PretrainedConfig], int]
    enable_bias: Callable[[nn.Module], None]  # export: give every output projection a bias to fold a shift into
    shrunk_config: Callable[[PretrainedConfig, Widths], PretrainedConfig | None]  # None: widths not expressible


def units_to_keep(num_units: int, kappa: float) -> int:
    """ceil(kappa * n), robust to float noise (0.3 * 10 must give 3, not 4)."""
    return max(1, math.ceil(round(kappa * num_units, 9)))
