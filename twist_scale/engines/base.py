"""The trainer's engine interface and what every engine shares: optimizer, schedule, the guarded step."""

from __future__ import annotations

import abc
import warnings

import torch
from torch import nn
from transformers import get_cosine_schedule_with_warmup
from transformers.modeling_outputs import CausalLMOutput

from twist_scale.config import OptimConfig
from twist_scale.distill import Distiller, TeacherBatch, input_ids_of
from twist_scale.engines.storage import EngineStorage


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    """No weight decay on vectors (norms, biases, unit statistics are buffers and never seen here).
    A ZeRO-3 parameter is an empty flat tensor by now: its true shape is `ds_shape`."""
    params = [p for p in model.parameters() if p.requires_grad]
    matrix = [len(getattr(p, "ds_shape", p.shape)) >= 2 for p in params]
    param_groups = [
        {"params": [p for p, m in zip(params, matrix, strict=True) if m], "weight_decay": cfg.weight_decay},
        {"params": [p for p, m in zip(params, matrix, strict=True) if not m], "weight_decay": 0.0},
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
    """What the trainer sees of an engine: train and evaluate one (sub-)model, its schedule, its files.

    Everything the synchronisation reads and writes (weights, moments, buffers, ranges) is the
    engine's `storage`, a separate interface (`engines.storage.EngineStorage`) the trainer never calls.
    """

    module: nn.Module
    optimizer: torch.optim.Optimizer  # or the engine's wrapper of one (see _torch_optimizer)
    scheduler: torch.optim.lr_scheduler.LRScheduler  # stepped once per train_step, skipped or not

    @property
    @abc.abstractmethod
    def storage(self) -> EngineStorage:
        """The engine's tensors as dispatch and aggregation read and write them."""

    distiller: Distiller | None = None  # --twist.distill: the teacher's term joins the training loss

    def train_step(self, micro_batches: list[torch.Tensor | TeacherBatch]) -> float:
        """One optimizer step over `micro_batches` (gradients accumulated); returns their mean loss.

        Never steps on a non-finite loss anywhere in the group (the ranks must agree, or ZeRO's
        collectives would diverge): returns NaN at the first one instead, before its backward, and the
        trainer stops or skips by config (skipping only without accumulation: an accumulated step has
        run backward already). A skipped step still advances the LR schedule, so every group stays on
        the same schedule. Micro-batches hold equal token counts (packed blocks), so the mean of their
        mean losses is the mean over the whole batch, and each backward takes 1/len of its loss.
        """
        total = 0.0
        for i, batch in enumerate(micro_batches):
            loss = self._loss(batch)
            finite = torch.tensor([float(torch.isfinite(loss.detach()).all())])
            if self._group_min(finite).item() < 1:
                with warnings.catch_warnings():  # torch warns when the schedule moves before any optimizer step
                    warnings.simplefilter("ignore", UserWarning)
                    self.scheduler.step()
                return float("nan")
            self._backward(loss / len(micro_batches), last=i == len(micro_batches) - 1)
            total += loss.item()
        self._optimizer_step()
        return total / len(micro_batches)

    @abc.abstractmethod
    def _backward(self, loss: torch.Tensor, last: bool) -> None:
        """Accumulate the gradient of `loss`; `last`: the step's final micro-batch."""

    @abc.abstractmethod
    def _optimizer_step(self) -> None:
        """Apply the accumulated gradient, advance the schedule, clear the gradient."""

    def _group_min(self, value: torch.Tensor) -> torch.Tensor:
        """Minimum over the ranks that train this subnet together (one process: itself)."""
        return value

    @torch.no_grad()
    def eval_loss(self, input_ids: torch.Tensor) -> float:
        """The cross-entropy alone: perplexity, whatever the training loss adds."""
        self.module.eval()
        try:
            return self._forward(input_ids).loss.item()
        finally:
            self.module.train()

    @torch.no_grad()
    def logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The model's logits in eval mode, without a graph (a teacher's forward)."""
        self.module.eval()
        try:
            return self._forward(input_ids).logits
        finally:
            self.module.train()

    def _loss(self, batch: torch.Tensor | TeacherBatch) -> torch.Tensor:
        output = self._forward(input_ids_of(batch))
        if self.distiller is None:
            return output.loss
        return self.distiller.loss(output.logits, output.loss, batch)

    @abc.abstractmethod
    def _forward(self, input_ids: torch.Tensor) -> CausalLMOutput:
        """The model's output with its cross-entropy on `input_ids` (labels are the inputs, shifted by the model)."""

    def _torch_optimizer(self) -> torch.optim.Optimizer:
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
            optimizer = self._torch_optimizer()
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


class StoringEngine(Engine, EngineStorage):
    """An engine that keeps its (sub-)model's tensors itself, as every engine here does: its storage is itself."""

    @property
    def storage(self) -> EngineStorage:
        return self
