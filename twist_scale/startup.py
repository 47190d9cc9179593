"""Start-up that never holds the whole model: the architecture is built on the meta device and filled
one block at a time (a decoder layer, the embedding, the head), from its initialisation or tensor by
tensor from a pretrained checkpoint's safetensors.

A TwIST rank keeps only its central pieces of each block, then lets the block go before the next is
made: its peak is one block, not the model, and its group's subnet is filled by the first dispatch.
A dense rank keeps every block, as its engine trains the whole model. Both fill blocks the same way,
seeded per block, so κ = 1 still starts from exactly the dense run's weights.
"""

from __future__ import annotations

import json
import math
import zlib
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Protocol

import torch
from safetensors import safe_open
from torch import nn

Keep = Callable[[str, torch.Tensor], bool]  # called with each filled tensor; True: release it afterwards
Arrange = Callable[[dict[str, torch.Tensor]], None]  # called with each filled block's tensors, before `keep`


class Pieces(Protocol):
    """Where a rank keeps only a flat range of some tensors (the central model's pieces)."""

    def piece_range(self, name: str) -> tuple[int, int] | None:
        """The flat range [lo, hi) of `name` kept here; None: not kept as a piece."""

    def set_piece(self, name: str, values: torch.Tensor) -> None:
        """Keep `values`, the flat range `piece_range(name)` of tensor `name`."""


def blocks(model: nn.Module) -> Iterator[tuple[str, nn.Module, bool]]:
    """(name, module, recurse): every layer of a ModuleList whole, then each other module's own tensors."""
    inside: set[int] = set()
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList):
            for i, layer in enumerate(module):
                inside |= {id(m) for m in layer.modules()}
                yield f"{name}.{i}", layer, True
    for name, module in model.named_modules():
        own = [*module.parameters(recurse=False), *module.buffers(recurse=False)]
        if id(module) not in inside and not isinstance(module, nn.ModuleList) and own:
            yield name, module, False


def block_tensors(block: nn.Module, name: str, recurse: bool) -> dict[str, torch.Tensor]:
    """A block's parameters and buffers by full name (its own only, unless `recurse`)."""
    return {**dict(block.named_parameters(name, recurse=recurse)), **dict(block.named_buffers(name, recurse=recurse))}


def local_directory(pretrained: str, patterns: list[str]) -> Path:
    """A checkpoint's directory: itself, or for a hub id the local snapshot of its files matching `patterns`."""
    directory = Path(pretrained)
    if directory.is_dir():
        return directory
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(pretrained, allow_patterns=patterns))


def pretrained_files(pretrained: str) -> dict[str, Path]:
    """Tensor name -> safetensors file of a local directory or hub id (sharded or not)."""
    directory = local_directory(pretrained, ["*.json", "*.safetensors"])
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        return {name: directory / file for name, file in json.loads(index.read_text())["weight_map"].items()}
    single = directory / "model.safetensors"
    if not single.is_file():
        raise FileNotFoundError(
            f"--model.pretrained {pretrained}: no model.safetensors(.index.json) there; save the model with "
            "save_pretrained(safe_serialization=True)"
        )
    with safe_open(single, "pt") as f:
        return {name: single for name in f.keys()}  # noqa: SIM118 - safe_open has no __iter__


def read_range(handle, name: str, lo: int, hi: int) -> torch.Tensor:  # noqa: ANN001 - a safetensors handle
    """Elements [lo, hi) of the flattened tensor `name`: only the rows that hold them are read."""
    shape = handle.get_slice(name).get_shape()
    inner = math.prod(shape[1:]) if len(shape) > 1 else 1
    first, last = lo // inner, -(-hi // inner)
    rows = handle.get_slice(name)[first:last]
    return rows.flatten()[lo - first * inner : hi - first * inner]


def fill(
    model: nn.Module,
    seed: int,
    pretrained: str,
    keep: Keep | None = None,
    arrange: Arrange | None = None,
    pieces: Pieces | None = None,
) -> None:
    """Materialise and fill a meta-device `model` block by block on the host.

    Each block is initialised as Hugging Face does (children before their parents, so GPT-2's scaled
    residual init wins), seeded by its name; a pretrained checkpoint then overwrites the tensors it
    holds. `arrange` may then rewrite the block's tensors in place (nested sampling sorts their units).
    `keep` sees every filled tensor of the block; those it returns True for go back to the meta device
    once the block is done.

    With `pieces`, a pretrained tensor kept as a piece is never materialised: its rows that hold the
    piece are read from the file (safetensors `get_slice`) and handed to `pieces.set_piece`, so a rank
    reads about 1/W of the checkpoint. Its initialisation is skipped, which changes no value: the file
    overwrites every parameter. Without a checkpoint every tensor is initialised whole, as the values
    must not depend on the world size.
    """
    files = pretrained_files(pretrained) if pretrained else {}
    prefix = getattr(model, "base_model_prefix", "") + "."
    stored = set(files) | {prefix + n for n in files}  # older files omit the base model's prefix

    def stored_as(name: str) -> str:
        return name if name in files else name.removeprefix(prefix)

    missing = [n for n, _ in model.named_parameters() if files and n not in stored]
    if missing:
        raise ValueError(
            f"--model.pretrained {pretrained} lacks {len(missing)} of the model's tensors (e.g. {missing[0]}); "
            "point it at a checkpoint of this architecture saved with save_pretrained"
        )
    with ExitStack() as stack:
        handles = {path: stack.enter_context(safe_open(path, "pt")) for path in set(files.values())}
        for block_name, block, recurse in blocks(model):
            ranges = {}  # the pretrained tensors read as pieces: never allocated whole
            if pieces is not None and arrange is None:
                ranges = {
                    n: pieces.piece_range(n) for n in block_tensors(block, block_name, recurse) if stored_as(n) in files
                }
                ranges = {n: r for n, r in ranges.items() if r is not None}
            for name, (lo, hi) in ranges.items():
                pieces.set_piece(name, read_range(handles[files[stored_as(name)]], stored_as(name), lo, hi))
            skipped = {id(t) for name, t in block_tensors(block, block_name, recurse).items() if name in ranges}
            block._apply(
                lambda t, skip=skipped: torch.empty_like(t, device="cpu") if t.is_meta and id(t) not in skip else t,
                recurse=recurse,
            )
            # after materialising: _apply made new parameters
            tensors = {name: t for name, t in block_tensors(block, block_name, recurse).items() if name not in ranges}
            for t in tensors.values():
                t._is_hf_initialized = False  # transformers skips tensors flagged as initialised
            torch.manual_seed(seed + zlib.crc32(block_name.encode()))
            for module in reversed(list(block.modules()) if recurse else [block]):
                model._init_weights(module)
            for name, t in tensors.items():
                if stored_as(name) in files:
                    with torch.no_grad():
                        t.copy_(handles[files[stored_as(name)]].get_tensor(stored_as(name)))
            if arrange is not None:
                arrange(tensors)
            released = {id(t) for name, t in tensors.items() if keep is not None and keep(name, t)}
            block._apply(lambda t, gone=released: t.to("meta") if id(t) in gone else t, recurse=recurse)
    model.tie_weights()  # materialising made new parameters: a tied head points at the embedding again


def materialise_rest(model: nn.Module, device: torch.device | str = "cpu", dtype: torch.dtype | None = None) -> None:
    """Storage on `device` for whatever is still on the meta device (its values come from the first
    dispatch); floating-point parameters in `dtype` where given (ZeRO-3 wants them in its training dtype)."""

    def allocate(t: torch.Tensor) -> torch.Tensor:
        if not t.is_meta:
            return t
        wanted = dtype if dtype is not None and isinstance(t, nn.Parameter) and t.is_floating_point() else t.dtype
        return torch.empty_like(t, device=device, dtype=wanted)

    model._apply(allocate)
    if hasattr(model, "tie_weights"):  # a whole model: a tied head points at the embedding again
        model.tie_weights()
