"""The engine interface and what every engine shares: optimizer, schedule, batch forward."""

from __future__ import annotations

import abc
import warnings

import torch
from torch import nn
from transformers import get_cosine_schedule_with_warmup

from twist_scale.config import OptimConfig


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    """No weight decay on vectors (norms, biases, unit statistics are buffers and never seen here)."""
    params = [p for p in model.parameters() if p.requires_grad]
    param_groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    if cfg.name == "sgd":
        return torch.optim.SGD(param_groups, lr=cfg.lr, momentum=cfg.beta1)
    return torch.optim.AdamW(param_groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, total_steps: int):  # noqa: ANN201
    return get_cosine_schedule_with_warmup(optimizer, min(cfg.warmup_steps, total_steps), total_steps)


def even_range(n: int, parts: int, index: int) -> tuple[int, int]:
    """Part `index` of [0, n) cut into `parts` ceil-sized parts, as ZeRO-3 partitions and torch.chunk cut."""
    part = -(-n // parts)
    return min(index * part, n), min((index + 1) * part, n)


def moment_keys(cfg: OptimConfig) -> tuple[str, ...]:
    """Optimizer state tensors that TwIST's 'aggregate' policy averages like the weights."""
    if cfg.name == "sgd":
        return ("momentum_buffer",) if cfg.beta1 > 0 else ()
    return ("exp_avg", "exp_avg_sq")


class Engine(abc.ABC):
    """Trains one (sub-)model; reads and writes its full (group-gathered) tensors by name."""

    module: nn.Module
    optimizer: torch.optim.Optimizer  # or the engine's wrapper of one (see torch_optimizer)
    scheduler: torch.optim.lr_scheduler.LRScheduler  # stepped once per train_step, skipped or not
    params: dict[str, nn.Parameter]  # the (sub-)model's parameters by name, as read/write address them

    def train_step(self, input_ids: torch.Tensor) -> float:
        """Forward, backward and optimizer step on one micro-batch; returns the loss.

        Never steps on a non-finite loss anywhere in the group (the ranks must agree, or ZeRO's
        collectives would diverge): returns NaN instead, and the trainer stops or skips by config.
        A skipped step still advances the LR schedule, so every group stays on the same schedule.
        """
        loss = self._loss(input_ids)
        finite = torch.tensor([float(torch.isfinite(loss.detach()).all())])
        if self._group_min(finite).item() < 1:
            with warnings.catch_warnings():  # torch warns when the schedule moves before any optimizer step
                warnings.simplefilter("ignore", UserWarning)
                self.scheduler.step()
            return float("nan")
        self._backward_and_step(loss)
        return loss.item()

    @abc.abstractmethod
    def _backward_and_step(self, loss: torch.Tensor) -> None: ...

    def _group_min(self, value: torch.Tensor) -> torch.Tensor:
        """Minimum over the ranks that train this subnet together (one process: itself)."""
        return value

    @torch.no_grad()
    def eval_loss(self, input_ids: torch.Tensor) -> float:
        self.module.eval()
        try:
            return self._loss(input_ids).item()
        finally:
            self.module.train()

    @abc.abstractmethod
    def _loss(self, input_ids: torch.Tensor) -> torch.Tensor: ...

    def local_tensors(self) -> list[torch.Tensor]:
        """The weights this rank stores (its shard where the engine shards them): a local check reads them."""
        return [p.detach() for p in self.module.parameters()]

    def submodule(self, name: str) -> nn.Module:
        """A module of the trained (sub-)model: where a correction sets its factor or shift."""
        return self.module.get_submodule(name)

    def read_buffer(self, name: str) -> torch.Tensor:
        """Buffers are never sharded: every rank holds its own full copy."""
        return self.module.get_buffer(name).detach()

    @torch.no_grad()
    def write_buffer(self, name: str, value: torch.Tensor) -> None:
        self.module.get_buffer(name).copy_(value)

    @abc.abstractmethod
    def read(self, name: str) -> torch.Tensor:
        """The full fp32 value of parameter `name` (collective within the group)."""

    @abc.abstractmethod
    def write(self, name: str, value: torch.Tensor) -> None:
        """Set parameter `name` everywhere the engine keeps a copy (master and working weights)."""

    @abc.abstractmethod
    def read_state(self, name: str, key: str) -> torch.Tensor:
        """Optimizer moment `key` of parameter `name`, full shape (zeros before the first step)."""

    @abc.abstractmethod
    def write_state(self, name: str, key: str, value: torch.Tensor) -> None: ...

    def shard_range(self, shape: torch.Size, dp_rank: int) -> tuple[int, int] | None:
        """Where the engine shards every parameter (ZeRO-3, FSDP): the flat range of one of `shape`
        that dp rank `dp_rank` of a group stores; None where each rank keeps parameters whole.

        A function of the shape alone, so dispatch can send each rank of any group only its shard.
        """
        return None

    def local_range(self, name: str) -> tuple[int, int]:
        """The flat range of parameter `name` whose master values (and moments) this rank stores itself.

        The ranges of a group's ranks tile the parameter, so aggregation can read each rank's own range
        and send it, gathering nothing. An engine that keeps whole parameters on every rank splits them
        evenly instead, so each element is still sent once; one that runs alone stores everything.
        """
        return 0, self.params[name].numel()

    def read_local(self, name: str, key: str = "") -> torch.Tensor:
        """The fp32 values of `local_range` (moment `key`, if not empty), flat: a view of the engine's
        storage where it keeps them in fp32, so aggregation copies nothing it does not send."""
        start, stop = self.local_range(name)
        return (self.read_state(name, key) if key else self.read(name)).reshape(-1)[start:stop]

    def ranged_state(self, name: str) -> bool:
        """Whether this rank stores only `local_range` of the moments of `name` (ZeRO-1/2's partitioned
        optimizer state, ZeRO-3, FSDP): dispatch then sends it only that range, for `write_shard`."""
        return False

    def write_shard(self, name: str, key: str, flat: torch.Tensor) -> None:
        """Set this rank's `local_range` of parameter `name` (of its moment `key`, if not empty): where
        the engine shards parameters (`shard_range`), or, for a moment, where `ranged_state`."""
        raise NotImplementedError(f"{type(self).__name__} keeps whole parameters: use write/write_state")

    @abc.abstractmethod
    def reset_optimizer_state(self) -> None:
        """Fresh moments and step counts, as if the optimizer had just been built."""

    def torch_optimizer(self) -> torch.optim.Optimizer:
        """The torch optimizer that holds the moments (inside any wrapper)."""
        return self.optimizer

    def resume_at(self, steps: int, moments: tuple[str, ...]) -> None:
        """Continue a run checkpointed at another world, whose engine files do not fit this one.

        The schedule moves on to `steps`. Where moments are aggregated, each parameter gets optimizer
        state with that step count (Adam's bias correction depends on it) for the next dispatch to fill.
        """
        with warnings.catch_warnings():  # torch warns when the schedule moves before any optimizer step
            warnings.simplefilter("ignore", UserWarning)
            for _ in range(steps):
                self.scheduler.step()
        if moments:
            optimizer = self.torch_optimizer()
            for group in optimizer.param_groups:
                for p in group["params"]:
                    state = optimizer.state[p]
                    state["step"] = torch.tensor(float(steps))
                    for key in moments:
                        state.setdefault(key, torch.zeros_like(p))

    @abc.abstractmethod
    def lr(self) -> float: ...

    @abc.abstractmethod
    def save(self, directory: str) -> None: ...

    @abc.abstractmethod
    def load(self, directory: str) -> None: ...


def zero_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    for state in optimizer.state.values():
        for key, value in state.items():
            if torch.is_tensor(value):
                value.zero_()
            elif key == "step":
                state[key] = 0
