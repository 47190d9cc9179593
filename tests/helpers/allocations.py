"""Peak host memory held by tensors created in a block of code, counted by torch itself.

A process's resident set cannot say it on the CPU: `torch.empty` leaves pages untouched (so unseen)
and freed heap is not given back. A dispatch mode sees every tensor an operator returns, and a
finalizer on its storage (torch keeps one Python object per live storage) sees it go.
"""

from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class HostTensorBytes(TorchDispatchMode):
    """`peak`: the most bytes of host tensor storage created under the mode that were alive at once."""

    def __init__(self) -> None:
        super().__init__()
        self.alive: set[int] = set()  # ids of the storages counted
        self.now = self.peak = 0

    def _gone(self, key: int, size: int) -> None:
        self.alive.discard(key)
        self.now -= size

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if type(t) is torch.Tensor and t.device.type == "cpu":
                storage = t.untyped_storage()
                key, size = id(storage), storage.nbytes()
                if key not in self.alive:
                    self.alive.add(key)
                    self.now += size
                    self.peak = max(self.peak, self.now)
                    weakref.finalize(storage, self._gone, key, size)
        return out
