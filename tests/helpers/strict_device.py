"""A process group that serves one device type only, the way NCCL serves only CUDA tensors.

CPU-only CI cannot run NCCL, so this stands in for it: the backend 'strict' accepts tensors on the
'lazy' device (torch's lazy-tensor backend, which computes on the host) and raises NCCL's own error
for any other, e.g. `No backend type associated with device type cpu`. Underneath it runs gloo on
host copies. `python strict_device.py ARGS` (under torchrun) runs `twist-train ARGS` on it, so a CPU
tensor that slips into any trainer collective fails the run exactly as it would on a GPU cluster.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch._lazy.ts_backend
import torch.distributed as dist
from torch._C._distributed_c10d import _create_work_from_future
from torch.futures import Future

SERVED = "lazy"


def _done() -> dist.Work:
    fut: Future = Future()
    fut.set_result(None)
    return _create_work_from_future(fut)


def _check(*tensors: torch.Tensor) -> None:
    for t in tensors:
        if t.device.type != SERVED:
            raise RuntimeError(f"No backend type associated with device type {t.device.type}")


class StrictProcessGroup(dist.ProcessGroup):
    """Refuses tensors off the served device; runs each collective through gloo on host copies."""

    def __init__(self, store: dist.Store, rank: int, size: int, timeout) -> None:  # noqa: ANN001
        super().__init__(rank, size)
        self.gloo = dist.ProcessGroupGloo(store, rank, size, timeout)

    @staticmethod
    def _on_host(tensors: list[torch.Tensor], collective: Callable[[list[torch.Tensor]], dist.Work]) -> dist.Work:
        """Check every tensor, run `collective` on host copies, copy the results back in place."""
        _check(*tensors)
        host = [t.cpu() for t in tensors]
        collective(host).wait()
        for t, h in zip(tensors, host, strict=True):
            t.copy_(h)
        return _done()

    def allreduce(self, tensors: list[torch.Tensor], opts) -> dist.Work:  # noqa: ANN001
        return self._on_host(tensors, lambda host: self.gloo.allreduce(host, opts))

    def broadcast(self, tensors: list[torch.Tensor], opts) -> dist.Work:  # noqa: ANN001
        return self._on_host(tensors, lambda host: self.gloo.broadcast(host, opts))

    def _gathering(self, outputs: list[list[torch.Tensor]], inputs: list[torch.Tensor], collective) -> dist.Work:  # noqa: ANN001
        """all-gather or gather (`outputs` empty off the root): outputs row by row, checked like the inputs."""
        n = len(inputs)
        flat = [*inputs, *(t for row in outputs for t in row)]

        def run(host: list[torch.Tensor]) -> dist.Work:
            rows = [host[n + i * len(row) : n + (i + 1) * len(row)] for i, row in enumerate(outputs)]
            return collective(rows, host[:n])

        return self._on_host(flat, run)

    def allgather(self, outputs: list[list[torch.Tensor]], inputs: list[torch.Tensor], opts) -> dist.Work:  # noqa: ANN001
        return self._gathering(outputs, inputs, lambda rows, ins: self.gloo.allgather(rows, ins, opts))

    def gather(self, outputs: list[list[torch.Tensor]], inputs: list[torch.Tensor], opts) -> dist.Work:  # noqa: ANN001
        return self._gathering(outputs, inputs, lambda rows, ins: self.gloo.gather(rows, ins, opts))

    def all_gather_single(self, output: torch.Tensor, input: torch.Tensor, opts) -> dist.Work:  # noqa: A002, ANN001
        return self._on_host([output, input], lambda host: self.gloo._allgather_base(*host, opts))

    def reduce_scatter_single(self, output: torch.Tensor, input: torch.Tensor, opts) -> dist.Work:  # noqa: A002, ANN001
        return self._on_host([output, input], lambda host: self.gloo._reduce_scatter_base(*host, opts))

    def all_to_all_single(self, output, input, output_splits, input_splits, opts) -> dist.Work:  # noqa: A002, ANN001
        return self._on_host(
            [output, input], lambda host: self.gloo.alltoall_base(*host, output_splits, input_splits, opts)
        )

    def barrier(self, opts=None) -> dist.Work:  # noqa: ANN001 - a barrier moves no user tensor
        self.gloo.barrier(dist.BarrierOptions()).wait()
        return _done()

    def getBackendName(self) -> str:  # noqa: N802 - torch's name
        return "strict"


def install() -> None:
    torch._lazy.ts_backend.init()
    dist.Backend.register_backend("strict", StrictProcessGroup, devices=[SERVED])


if __name__ == "__main__":
    install()
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from twist_scale.commands.train import main as train

    train(sys.argv[1:])
