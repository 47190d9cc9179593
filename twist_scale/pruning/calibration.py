"""What calibrated pruning methods read from calibration text, and the text itself.

`ActivationStats` are gathered at the input of each output projection (o_proj / down_proj /
c_proj) — the same place where TwIST's 'mean' correction keeps its running means, so FLAP's bias
compensation is exactly the 'mean' fold with calibration means (`PruneMethod.correction`).
`collect_gradients` gives the loss gradients `taylor` reads; `mean_token_nll` the loss a candidate
subnet scores (`random_best`), the one loss loop evaluation's perplexity uses too. Calibration
batches are random windows of a tokenized stream (`calibration_batches`, `calibration_from_files`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedTokenizerBase

from twist_scale.data import token_stream
from twist_scale.importance import variance
from twist_scale.models import UnitBlock


@dataclass(frozen=True)
class ActivationStats:
    """Per input channel of each output projection (keyed by module name): E[x] and E[x²] over tokens."""

    mean: dict[str, torch.Tensor]
    sq_mean: dict[str, torch.Tensor]
    tokens: int

    def variance(self, module: str) -> torch.Tensor:
        return variance(self.mean[module], self.sq_mean[module])


@torch.no_grad()
def collect_activation_stats(
    model: nn.Module, unit_blocks: list[UnitBlock], batches: Iterable[torch.Tensor]
) -> ActivationStats:
    """E[x], E[x²] of every output projection's input over all calibration tokens (float64 sums)."""
    sums: dict[str, torch.Tensor] = {}
    squares: dict[str, torch.Tensor] = {}

    def hook(name: str) -> Callable:
        def pre_hook(module: nn.Module, args: tuple) -> None:
            x = args[0].detach().double().reshape(-1, args[0].shape[-1])  # (tokens, unit channels)
            sums[name] = sums.get(name, 0) + x.sum(0)
            squares[name] = squares.get(name, 0) + (x**2).sum(0)

        return pre_hook

    modules = sorted({unit_block.output_module for unit_block in unit_blocks})
    handles = [model.get_submodule(m).register_forward_pre_hook(hook(m)) for m in modules]
    was_training = model.training
    model.eval()
    n = 0
    try:
        for batch in batches:
            model(input_ids=batch)
            n += batch.numel()
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    if n == 0:
        raise ValueError("no calibration tokens: the calibration text is empty or shorter than one window")
    return ActivationStats(
        {m: (sums[m] / n).float() for m in modules}, {m: (squares[m] / n).float() for m in modules}, n
    )


def collect_gradients(
    model: nn.Module, unit_blocks: list[UnitBlock], batches: Iterable[torch.Tensor]
) -> dict[str, torch.Tensor]:
    """∂L/∂w for every parameter the unit blocks slice, L = the mean next-token loss over all
    calibration tokens — one backward of the mean loss over all examples, as LLM-Pruner takes it,
    accumulated batch by batch (each batch's summed loss) so memory stays one batch's.

    The model is left as it was: gradients come from `torch.autograd.grad`, so no `.grad` is written;
    `requires_grad` and train mode are restored; eval mode meanwhile, so dropout does not add noise.
    """
    names = {a.name for unit_block in unit_blocks for a in unit_block.axes}
    params = {n: p for n, p in model.named_parameters() if n in names}
    flags = {n: p.requires_grad for n, p in params.items()}
    sums = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}
    was_training = model.training
    model.eval()
    tokens = 0
    try:
        for p in params.values():
            p.requires_grad_(True)
        for batch in batches:
            with torch.enable_grad():
                logits = model(input_ids=batch).logits[:, :-1].float()
                loss = F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten(), reduction="sum")
                grads = torch.autograd.grad(loss, list(params.values()))
            for name, g in zip(params, grads, strict=True):
                sums[name] += g.float()
            tokens += batch[:, 1:].numel()
    finally:
        for n, p in params.items():
            p.requires_grad_(flags[n])
        model.train(was_training)
    if tokens == 0:
        raise ValueError("no calibration tokens: the calibration text is empty or shorter than one window")
    return {n: (s / tokens).to(params[n].dtype) for n, s in sums.items()}


@torch.no_grad()
def mean_token_nll(model: nn.Module, batches: Iterable[torch.Tensor]) -> float:
    """Mean next-token NLL (nats) over every calibration token: float64 sums, so batch order cannot matter."""
    total, tokens = torch.zeros((), dtype=torch.float64), 0
    model.eval()
    for batch in batches:
        logits = model(input_ids=batch).logits[:, :-1].float()
        total += F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten(), reduction="sum").double()
        tokens += batch[:, 1:].numel()
    if tokens == 0:
        raise ValueError("no calibration tokens: the calibration text is empty or shorter than one window")
    return total.item() / tokens


def calibration_batches(
    stream: torch.Tensor, samples: int, seqlen: int, batch_size: int, seed: int = 0
) -> list[torch.Tensor]:
    """`samples` random windows of `seqlen` tokens from a 1-D id stream (wanda: 128 × 2048 from C4)."""
    if stream.numel() <= seqlen:
        raise ValueError(f"calibration text has {stream.numel()} tokens, fewer than one window of {seqlen}")
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, stream.numel() - seqlen, (samples,), generator=g)
    windows = torch.stack([stream[s : s + seqlen] for s in starts.tolist()])
    return list(windows.split(batch_size))


def calibration_from_files(
    files: list[str], tokenizer: PreTrainedTokenizerBase, samples: int, seqlen: int, seed: int = 0
) -> list[torch.Tensor]:
    for f in files:
        if not Path(f).is_file():
            raise FileNotFoundError(f"calibration file {f} does not exist; fix --calibration")
    return calibration_batches(token_stream(files, tokenizer), samples, seqlen, batch_size=8, seed=seed)
