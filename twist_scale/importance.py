"""Which units matter: FLAP's fluctuation score, one function for training and for export.

A unit's importance is what removing it moves the output by once its mean is compensated by a bias
(correction 'mean'): Var(X_j) · ‖W_:,j‖² over its channels j at the output projection's input (FLAP's
WIFV, squared for attention as FLAP does), standardised within the unit block so layers and kinds share
one scale. A rewired run ranks units with it every round from the central model's running statistics
(`sync.SubnetSync.unit_importance`); the `ranked` and `adaptive_stats` exports rank the final central
model's statistics with it, so they keep the units the groups shared most.
"""

from __future__ import annotations

import torch

from twist_scale.models import UnitBlock


def variance(mean: torch.Tensor, sq_mean: torch.Tensor) -> torch.Tensor:
    """Var(X_j) from E[x] and E[x²], in the statistics' own precision (as FLAP computes it), never negative."""
    return (sq_mean - mean**2).clamp_min(0.0)


def fluctuation(column_sq_norms: torch.Tensor, channel_variance: torch.Tensor) -> torch.Tensor:
    """WIFV per channel: Var(X_j) · ‖W_:,j‖², from the projection's squared column norms."""
    return column_sq_norms.double() * channel_variance.double()


def standardized(scores: torch.Tensor) -> torch.Tensor:
    """z-scores over all entries (unbiased std, as torch.std in FLAP's code); no spread: all zeros."""
    std = scores.std()
    return (scores - scores.mean()) / std if std > 0 else torch.zeros_like(scores)


def unit_importance(block: UnitBlock, channels: torch.Tensor) -> torch.Tensor:
    """FLAP AL-AM's comparable per-unit score from a block's per-channel fluctuation: squared for attention,
    standardised over the block's channels, averaged over each unit's channels (FLAP: per head). A block
    whose channels all score alike has no spread: all zeros."""
    if block.kind == "attn":
        channels = channels**2
    return block.output_axis.per_unit(standardized(channels), block.num_units) / block.output_axis.unit_width
