"""Single-process engine: plain torch, for tests, debugging and the oracle of the DeepSpeed one."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from transformers.modeling_outputs import CausalLMOutput

from twist_scale.config import RunConfig
from twist_scale.engines.base import StoringEngine, build_optimizer, build_scheduler
from twist_scale.engines.storage import zero_optimizer_state
from twist_scale.startup import materialise_rest


class SingleProcessEngine(StoringEngine):
    def __init__(self, model: nn.Module, cfg: RunConfig) -> None:
        materialise_rest(model)  # a TwIST subnet arrives on the meta device; dispatch fills it
        self.module = model.train()
        self.cfg = cfg
        self.optimizer = build_optimizer(model, cfg.optim)
        self.scheduler = build_scheduler(self.optimizer, cfg.optim, cfg.total_steps)
        self.params = dict(model.named_parameters())

    def _forward(self, input_ids: torch.Tensor) -> CausalLMOutput:
        return self.module(input_ids=input_ids, labels=input_ids)

    def _backward(self, loss: torch.Tensor, last: bool) -> None:
        loss.backward()

    def _optimizer_step(self) -> None:
        if self.cfg.optim.grad_clip > 0:
            nn.utils.clip_grad_norm_(self.module.parameters(), self.cfg.optim.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    def read(self, name: str) -> torch.Tensor:
        return self.params[name].detach().float().clone()

    @torch.no_grad()
    def write(self, name: str, value: torch.Tensor) -> None:
        self.params[name].copy_(value)

    def read_state(self, name: str, key: str) -> torch.Tensor:
        value = self.optimizer.state[self.params[name]].get(key)
        return torch.zeros_like(self.params[name], dtype=torch.float32) if value is None else value.float().clone()

    @torch.no_grad()
    def write_state(self, name: str, key: str, value: torch.Tensor) -> None:
        state = self.optimizer.state[self.params[name]]
        state.setdefault("step", torch.zeros((), dtype=torch.float32))
        if key in state:
            state[key].copy_(value)
        else:
            state[key] = value.clone().to(self.params[name].dtype)

    def reset_optimizer_state(self) -> None:
        zero_optimizer_state(self.optimizer)

    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def save(self, directory: str) -> None:
        state = {
            "model": self.module.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
        }
        torch.save(state, Path(directory) / "engine.pt")

    def load(self, directory: str) -> None:
        state = torch.load(Path(directory) / "engine.pt", weights_only=False)
        self.module.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
