"""Nested subnets' unit order: each block's most important units first, fixed at the start.

Under `--twist.sampling nested` a group at κ trains the first ⌈κ·n⌉ units of every partitioned
block in every round, so the run trains one subnet per size (Matryoshka / slimmable networks), not
fresh draws. Which units come first matters when training starts from a pretrained base: its heads
and neurons are far from alike. So the start-up sorts each block's units by the squared norm of the
weights they own, largest first. Permuting heads or neurons changes no output, and afterwards the
order is simply the unit ids: every rank, checkpoint and export agrees on it without storing it, and
`--method prefix` exports the subnet a group trained.
"""

from __future__ import annotations

import torch
from torch import nn

from twist_scale.models import UnitBlock
from twist_scale.pruning.scores import owned_sum
from twist_scale.subnet import slice_tensor


@torch.no_grad()
def sort_units_by_weight_norm(tensors: dict[str, torch.Tensor], unit_blocks: list[UnitBlock]) -> None:
    """Permute, in place, the units of every unit block held in `tensors` (one start-up block's tensors,
    by full name) into descending owned squared weight norm; ties keep the lower id first."""
    for unit_block in unit_blocks:
        held = [axis.name in tensors for axis in unit_block.axes]
        if not any(held):
            continue
        if not all(held):
            missing = next(a.name for a, h in zip(unit_block.axes, held, strict=True) if not h)
            raise RuntimeError(f"unit block {unit_block.key} spans start-up blocks: {missing} is filled elsewhere")

        def square(name: str) -> torch.Tensor | None:
            t = tensors[name]
            return t.double() ** 2 if isinstance(t, nn.Parameter) else None  # buffers (statistics) do not score

        order = torch.sort(-owned_sum(unit_block, square), stable=True).indices
        for axis in unit_block.axes:
            t = tensors[axis.name]
            t.copy_(slice_tensor(t, axis, order))
