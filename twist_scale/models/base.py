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
from transformers.pytorch_utils import Conv1D

Widths = dict[int, dict[str, int]]  # layer -> {"attn": units, "mlp": units}


@dataclass(frozen=True)
class AxisSlice:
    """Along `axis` of tensor `name`, unit u owns `width` contiguous elements at u*width in each segment."""

    name: str
    axis: int
    width: int
    segments: int = 1
    segment_stride: int = 0

    def index(self, units: torch.Tensor) -> torch.Tensor:
        base = (units[:, None] * self.width + torch.arange(self.width)).flatten()
        return torch.cat([base + s * self.segment_stride for s in range(self.segments)])


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
    fix_module_attrs: Callable[[nn.Module, PretrainedConfig], None]  # after slicing: widths the modules cache
    num_layers: Callable[[PretrainedConfig], int]
    enable_bias: Callable[[nn.Module], None]  # export: give every output projection a bias to fold a shift into
    shrunk_config: Callable[[PretrainedConfig, Widths], PretrainedConfig | None]  # None: widths not expressible


def fix_linear_and_conv(model: nn.Module) -> None:
    """Make every Linear / Conv1D state the shape its (sliced) weight now has."""
    for module in model.modules():
        if isinstance(module, nn.Linear):
            module.out_features, module.in_features = module.weight.shape
        elif isinstance(module, Conv1D):
            module.nx, module.nf = module.weight.shape


def units_to_keep(num_units: int, kappa: float) -> int:
    """ceil(kappa * n), robust to float noise (0.3 * 10 must give 3, not 4)."""
    return max(1, math.ceil(round(kappa * num_units, 9)))
