"""DeepSpeed ZeRO (stages 0-3) over one TwIST group's process group.

Reads and writes go through DeepSpeed's safe_{get,set}_full_* API. Trap: under
ZeRO the setter updates only the fp32 master partition, and the working weights keep their old
value until the next step; writing only p.data is undone by the next step. `write` sets both.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.accelerator import get_accelerator
from deepspeed.utils import (
    safe_get_full_fp32_param,
    safe_get_full_optimizer_state,
    safe_get_local_fp32_param,
    safe_get_local_optimizer_state,
    safe_set_full_fp32_param,
    safe_set_full_optimizer_state,
    safe_set_local_fp32_param,
    safe_set_local_optimizer_state,
)
from torch import nn
from transformers.modeling_outputs import CausalLMOutput

from twist_scale.config import ConfigError, RunConfig
from twist_scale.engines.base import StoringEngine, build_optimizer, build_scheduler, even_range
from twist_scale.engines.storage import zero_optimizer_state
from twist_scale.startup import blocks, materialise_rest
from twist_scale.topology import Topology

RUN_OWNED = ("optimizer", "scheduler")


def render_ds_config(path: str, cfg: RunConfig, ranks_per_group: int) -> dict[str, Any]:
    """Fill the run-owned "auto" values of an engine-only ds_config; refuse what the run owns."""
    raw = json.loads(Path(path).read_text())
    for key in RUN_OWNED:
        if key in raw:
            raise ConfigError(f"{path}: '{key}' is set by the run config (--optim.*), remove it from the JSON")
    owned = {
        "train_micro_batch_size_per_gpu": cfg.data.micro_batch_size,
        "gradient_accumulation_steps": cfg.optim.grad_accum_steps,
        "train_batch_size": cfg.data.micro_batch_size * cfg.optim.grad_accum_steps * ranks_per_group,
        "gradient_clipping": cfg.optim.grad_clip,
        "bf16.enabled": cfg.parallel.precision == "bf16",
        "fp16.enabled": False,
    }

    def fill(node: dict[str, Any], prefix: str) -> None:
        for key, value in node.items():
            path_key = f"{prefix}{key}"
            if isinstance(value, dict):
                fill(value, f"{path_key}.")
            elif value == "auto":
                if path_key not in owned:
                    raise ConfigError(f"{path}: '{path_key}' is 'auto' but the run config does not own it; set a value")
                node[key] = owned[path_key]

    fill(raw, "")
    for key in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size"):
        raw.setdefault(key, owned[key])
    raw.setdefault("bf16", {})["enabled"] = owned["bf16.enabled"]
    raw.setdefault("steps_per_print", 10**9)
    raw.setdefault("zero_allow_untested_optimizer", True)  # the run's torch optimizer (AdamW or SGD)
    return raw


def allocate_partitioned(
    model: nn.Module, ds_config: dict[str, Any], topo: Topology, dtype: torch.dtype | None
) -> None:
    """ZeRO-3 from the meta device: each block (a decoder layer, or one module's own tensors: the
    embedding, a norm, the head) is allocated on the device and cut to this rank's partitions
    (`deepspeed.zero.Init` on that block) before the next, so a rank holds its partitions plus one
    block, never the whole subnet (at a 128k vocabulary the embedding and the head are the largest
    blocks: one at a time). DeepSpeed's optimizer set-up later gathers each parameter once, one at a
    time, no more. Tensors that already hold values (dense runs) are partitioned as they are."""
    device = get_accelerator().current_device_name()
    deepspeed.init_distributed(dist.get_backend())  # adopts the run's process group; zero.Init reads the world early

    def partition(module: nn.Module) -> None:
        materialise_rest(module, device, dtype)
        deepspeed.zero.Init(
            module=module, config_dict_or_path=ds_config, data_parallel_group=topo.intra_group, mpu=topo
        )

    for _, block, _ in blocks(model):
        partition(block)
    partition(model)  # a tied head's embedding again, and anything no block holds


class DeepSpeedEngine(StoringEngine):
    def __init__(self, model: nn.Module, cfg: RunConfig, topo: Topology) -> None:
        self.topo = topo
        ds_config = render_ds_config(cfg.parallel.ds_config, cfg, topo.ranks_per_group)
        if ds_config.get("zero_optimization", {}).get("stage", 0) == 3:
            allocate_partitioned(model, ds_config, topo, torch.bfloat16 if cfg.parallel.precision == "bf16" else None)
        else:
            materialise_rest(model)  # ZeRO-0/1/2 keep the whole subnet on every rank; dispatch fills it
        optimizer = build_optimizer(model, cfg.optim)
        scheduler = build_scheduler(optimizer, cfg.optim, cfg.total_steps)
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config, mpu=topo
        )
        self.module = self.engine.module
        self.stage = self.engine.zero_optimization_stage()
        self.params = dict(self.module.named_parameters())
        self._moments_linked = False

    def _forward(self, input_ids: torch.Tensor) -> CausalLMOutput:
        input_ids = input_ids.to(self.engine.device)
        return self.engine(input_ids=input_ids, labels=input_ids)

    def _backward(self, loss: torch.Tensor, last: bool) -> None:
        # DeepSpeed counts micro-batches itself (gradient_accumulation_steps in its config): it reduces
        # and steps at the boundary, and `step` before it only counts. The loss is already scaled.
        if self.engine.is_gradient_accumulation_boundary() != last:
            raise RuntimeError(f"DeepSpeed's micro-batch count {self.engine.micro_steps} left the step's boundary")
        self.engine.backward(loss, scale_wrt_gas=False)
        self.engine.step()

    def _optimizer_step(self) -> None:
        """DeepSpeed stepped at the last micro-batch's boundary."""

    def _group_min(self, value: torch.Tensor) -> torch.Tensor:
        value = value.to(self.topo.device)
        dist.all_reduce(value, op=dist.ReduceOp.MIN, group=self.topo.intra_group)
        return value.cpu()

    def _plain(self, param: nn.Parameter) -> bool:
        """Stage 0 in fp32: the torch optimizer works on the parameters themselves."""
        return not hasattr(param, "ds_id") and not hasattr(param, "_hp_mapping")

    def local_tensors(self) -> list[torch.Tensor]:
        return [getattr(p, "ds_tensor", p).detach() for p in self.module.parameters()]  # ZeRO-3: the partition

    def read(self, name: str) -> torch.Tensor:
        p = self.params[name]
        if self._plain(p):
            return p.detach().float().cpu().clone()
        return safe_get_full_fp32_param(p).float().cpu().view(p.ds_shape if hasattr(p, "ds_id") else p.shape)

    @torch.no_grad()
    def write(self, name: str, value: torch.Tensor) -> None:
        p = self.params[name]
        value = value.to(self.engine.device)
        if self._plain(p):
            p.copy_(value)
            return
        safe_set_full_fp32_param(p, value.float())
        if hasattr(p, "ds_id"):  # ZeRO-3: the working weight is this rank's flat partition
            part = p.ds_tensor
            start = part.numel() * self.topo.dp_rank
            chunk = value.flatten()[start : start + part.numel()]
            part.data[: chunk.numel()].copy_(chunk)
        else:
            p.data.copy_(value)

    def read_state(self, name: str, key: str) -> torch.Tensor:
        p = self.params[name]
        if self._plain(p):
            value = self.optimizer.state[p].get(key)
            return torch.zeros(p.shape) if value is None else value.float().cpu().clone()
        self._link_optimizer_states()
        shape = p.ds_shape if hasattr(p, "ds_id") else p.shape
        return safe_get_full_optimizer_state(p, key).float().cpu().view(shape)

    @torch.no_grad()
    def write_state(self, name: str, key: str, value: torch.Tensor) -> None:
        p = self.params[name]
        value = value.to(self.engine.device)
        if self._plain(p):
            state = self.optimizer.state[p]
            state.setdefault("step", torch.zeros((), dtype=torch.float32))
            state.setdefault(key, torch.zeros_like(p)).copy_(value)
            return
        self._link_optimizer_states()
        safe_set_full_optimizer_state(p, value.float(), key)

    def shard_range(self, shape: torch.Size, dp_rank: int) -> tuple[int, int] | None:
        """ZeRO-3 keeps a flat partition of ceil(n / R) elements of each parameter per rank."""
        if self.stage != 3:
            return None
        return even_range(math.prod(shape), self.topo.ranks_per_group, dp_rank)

    def shard_of(self, name: str) -> tuple[int, int]:
        """ZeRO-3: the partition; ZeRO-1/2: the fragment of the fp32 partition; stage 0 in fp32: an equal split."""
        p = self.params[name]
        if hasattr(p, "ds_id"):
            return self.shard_range(p.ds_shape, self.topo.dp_rank)
        if hasattr(p, "_hp_mapping"):
            if p._hp_mapping is None:  # this rank's partition holds none of it
                return 0, 0
            address = p._hp_mapping.lp_fragment_address
            return address.start, address.start + address.numel
        return even_range(p.numel(), self.topo.ranks_per_group, self.topo.dp_rank)

    def read_shard(self, name: str, key: str = "") -> torch.Tensor:
        """Views of DeepSpeed's fp32 master partition and its moments: nothing is gathered or copied."""
        p = self.params[name]
        start, stop = self.shard_of(name)
        if key:
            self._link_optimizer_states()
        if hasattr(p, "ds_id"):  # the partition is padded at the end
            local = safe_get_local_optimizer_state(p, key) if key else safe_get_local_fp32_param(p)
            return local.view(-1)[: stop - start]
        if hasattr(p, "_hp_mapping"):
            if p._hp_mapping is None:
                return torch.empty(0, device=self.engine.device)
            return p._hp_mapping.get_hp_fragment(key or None).view(-1)
        if key:
            return super().read_shard(name, key)
        return p.detach().view(-1)[start:stop]

    def ranged_state(self, name: str) -> bool:
        """ZeRO-1/2 keep only this rank's fragment of each moment, ZeRO-3 only its partition."""
        return not self._plain(self.params[name])

    @torch.no_grad()
    def write_shard(self, name: str, key: str, flat: torch.Tensor) -> None:
        p = self.params[name]
        if self.stage != 3 and key and hasattr(p, "_hp_mapping"):  # ZeRO-1/2: the moment's fragment
            self._link_optimizer_states()
            if p._hp_mapping is not None:
                p._hp_mapping.get_hp_fragment(key).view(-1).copy_(flat)
            return
        if self.stage != 3:
            super().write_shard(name, key, flat)
        padded = torch.zeros(p.ds_tensor.numel(), device=self.engine.device)  # the last partition is padded
        padded[: flat.numel()] = flat.to(self.engine.device)
        if key:
            safe_set_local_optimizer_state(p, padded, key)
            return
        safe_set_local_fp32_param(p, padded)
        p.ds_tensor.data.copy_(padded)  # the working weight is the same partition

    def _link_optimizer_states(self) -> None:
        """Re-link ZeRO-1/2 moment views. DeepSpeed 0.19 links them once, after the first param
        group's step, so every later group is left with no moments (safe_get_* raises)."""
        if not self._moments_linked and hasattr(self.optimizer, "_lazy_init_hp_params_optimizer_state"):
            self.optimizer._hp_optimizer_states_linked = False
            self.optimizer._lazy_init_hp_params_optimizer_state()
        self._moments_linked = True

    def reset_optimizer_state(self) -> None:
        zero_optimizer_state(self._torch_optimizer())

    def _torch_optimizer(self) -> torch.optim.Optimizer:
        return getattr(self.optimizer, "optimizer", self.optimizer)

    def resume_at(self, steps: int, moments: tuple[str, ...]) -> None:
        super().resume_at(steps, moments)
        self._moments_linked = False  # the state just created must be linked to the parameters

    def lr(self) -> float:
        return self.engine.get_lr()[0]

    def save(self, directory: str) -> None:
        self.engine.save_checkpoint(directory, tag="engine")

    def load(self, directory: str) -> None:
        path, _ = self.engine.load_checkpoint(directory, tag="engine")
        self._moments_linked = False
        if path is None:
            raise FileNotFoundError(f"no DeepSpeed checkpoint under {directory}")
