"""PyTorch FSDP2 (`fully_shard`) over one TwIST group: the second sharded engine beside DeepSpeed.

The world is a 2-D DeviceMesh (group, dp) laid out as in topology.py (global rank = group * R + dp).
Each decoder layer and the root are sharded over `dp` only, so a group trains its own subnet and
nothing crosses groups until aggregation. Parameters and optimizer moments are DTensors sharded on
dim 0: reads gather them with `full_tensor()`; writes copy this rank's shard, without any
communication, into the local storage that FSDP all-gathers from before the next forward.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor
from transformers.modeling_outputs import CausalLMOutput

from twist_scale.config import RunConfig
from twist_scale.engines.base import StoringEngine, build_optimizer, build_scheduler, even_range
from twist_scale.engines.layers import decoder_layers
from twist_scale.engines.storage import zero_optimizer_state
from twist_scale.topology import Topology

SCHEDULER_FILE = "scheduler.pt"


def build_mesh(topo: Topology, device_type: str) -> DeviceMesh:
    """The (group, dp) mesh; refuses a layout that disagrees with the Topology's rank arithmetic."""
    layout = torch.arange(topo.world_size).view(topo.groups, topo.ranks_per_group)
    # the topology's own groups, under the run's timeout (init_device_mesh would make new ones with torch's 30 min)
    mesh = DeviceMesh.from_group(
        [topo.cross_group, topo.intra_group], device_type, mesh=layout, mesh_dim_names=("group", "dp")
    )
    if tuple(mesh.get_coordinate() or ()) != (topo.group, topo.dp_rank):
        raise RuntimeError(
            f"rank {topo.rank}: mesh coordinate {mesh.get_coordinate()} is not (group {topo.group}, dp {topo.dp_rank})"
        )
    return mesh


def apply_fsdp(model: nn.Module, mesh: DeviceMesh, bf16: bool) -> None:
    """Shard every decoder layer, then the root (embeddings, final norm, LM head), over `mesh`.

    Every unit reshards after forward, the root included: `write` updates the shards, and a gathered
    copy kept from an eval forward would otherwise be stale.
    """
    mp = (
        MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else MixedPrecisionPolicy()
    )
    for layer in decoder_layers(model):
        fully_shard(layer, mesh=mesh, reshard_after_forward=True, mp_policy=mp)
    fully_shard(model, mesh=mesh, reshard_after_forward=True, mp_policy=mp)


def shard_then_allocate(model: nn.Module, mesh: DeviceMesh, bf16: bool, device: torch.device) -> None:
    """Shard `model` and give each rank storage for its shards alone.

    A TwIST subnet arrives on the meta device (its values come with the first dispatch): it is sharded
    there and only then allocated (`to_empty`), so no rank ever holds the whole subnet; the buffers that
    start-up did compute (rotary frequencies) are put back after. A model with values (dense runs) is
    moved whole and sharded, as it must be to keep them.
    """
    if not any(p.is_meta for p in model.parameters()):
        apply_fsdp(model.to(device), mesh, bf16)
        return
    computed = {name: b for name, b in model.named_buffers() if not b.is_meta}
    apply_fsdp(model, mesh, bf16)
    model.to_empty(device=device)
    with torch.no_grad():
        for name, value in computed.items():
            model.get_buffer(name).copy_(value)


def full_value(t: torch.Tensor) -> torch.Tensor:
    """A detached fp32 CPU copy of the whole tensor (collective over its mesh when sharded)."""
    return (t.full_tensor() if isinstance(t, DTensor) else t).detach().float().cpu().clone()


def local_shard(value: torch.Tensor, like: DTensor) -> DTensor:
    """This rank's piece of a full `value`, placed like `like`; every rank holds `value`, so no scatter."""
    return distribute_tensor(value.to(like.device, like.dtype), like.device_mesh, like.placements, src_data_rank=None)


class FSDPEngine(StoringEngine):
    def __init__(self, model: nn.Module, cfg: RunConfig, topo: Topology) -> None:
        self.cfg, self.topo = cfg, topo
        self.device = topo.device  # FSDP computes where its collectives run
        self.mesh = build_mesh(topo, topo.device.type)
        shard_then_allocate(model, self.mesh["dp"], cfg.parallel.precision == "bf16", self.device)
        self.module = model.train()
        self.optimizer = build_optimizer(model, cfg.optim)
        self.scheduler = build_scheduler(self.optimizer, cfg.optim, cfg.total_steps)
        self.params = dict(model.named_parameters())

    def _forward(self, input_ids: torch.Tensor) -> CausalLMOutput:
        input_ids = input_ids.to(self.device)
        return self.module(input_ids=input_ids, labels=input_ids)

    def _backward(self, loss: torch.Tensor, last: bool) -> None:
        # FSDP reduce-scatters gradients (mean over the group's dp ranks) after every micro-batch and sums
        # them into the sharded gradient: no unsharded gradient is kept between micro-batches
        loss.backward()

    def _optimizer_step(self) -> None:
        if self.cfg.optim.grad_clip > 0:  # DTensor gradients: the norm is over the group's full gradient
            nn.utils.clip_grad_norm_(self.module.parameters(), self.cfg.optim.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    def _group_min(self, value: torch.Tensor) -> torch.Tensor:
        value = value.to(self.topo.device)
        dist.all_reduce(value, op=dist.ReduceOp.MIN, group=self.mesh["dp"].get_group())
        return value.cpu()

    def local_tensors(self) -> list[torch.Tensor]:
        return [p.to_local().detach() for p in self.params.values()]

    def read(self, name: str) -> torch.Tensor:
        return full_value(self.params[name])

    @torch.no_grad()
    def write(self, name: str, value: torch.Tensor) -> None:
        p = self.params[name]
        p.to_local().copy_(local_shard(value, p).to_local())

    def read_state(self, name: str, key: str) -> torch.Tensor:
        p = self.params[name]
        value = self.optimizer.state[p].get(key)
        return torch.zeros(p.shape) if value is None else full_value(value)

    @torch.no_grad()
    def write_state(self, name: str, key: str, value: torch.Tensor) -> None:
        p = self.params[name]
        state = self.optimizer.state[p]
        if key in state:
            state[key].to_local().copy_(local_shard(value, state[key]).to_local())
            return
        state.setdefault("step", torch.zeros((), dtype=torch.float32))
        state[key] = local_shard(value, p)

    def shard_range(self, shape: torch.Size, dp_rank: int) -> tuple[int, int] | None:
        """FSDP2 shards dim 0 as torch.chunk does: ceil(d0 / R) rows per rank, the last ones short or empty."""
        first, last = even_range(shape[0], self.topo.ranks_per_group, dp_rank)
        inner = math.prod(shape[1:])
        return first * inner, last * inner

    def shard_of(self, name: str) -> tuple[int, int]:
        return self.shard_range(self.params[name].shape, self.topo.dp_rank)

    def read_shard(self, name: str, key: str = "") -> torch.Tensor:
        """A view of this rank's fp32 shard (mixed precision casts copies; the sharded parameter stays fp32)."""
        p = self.params[name]
        value = self.optimizer.state[p].get(key) if key else p
        if value is None:  # no step yet
            start, stop = self.shard_of(name)
            return torch.zeros(stop - start, device=self.device)
        return value.to_local().detach().view(-1)

    def ranged_state(self, name: str) -> bool:
        return True  # the moments are DTensors sharded like their parameter

    @torch.no_grad()
    def write_shard(self, name: str, key: str, flat: torch.Tensor) -> None:
        p = self.params[name]
        if not key:
            p.to_local().view(-1).copy_(flat)
            return
        state = self.optimizer.state[p]
        if key not in state:
            state.setdefault("step", torch.zeros((), dtype=torch.float32))
            state[key] = DTensor.from_local(
                torch.zeros_like(p.to_local()), p.device_mesh, p.placements, shape=p.shape, stride=p.stride()
            )
        state[key].to_local().view(-1).copy_(flat)

    def reset_optimizer_state(self) -> None:
        zero_optimizer_state(self.optimizer)

    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def _state(self) -> dict[str, dict]:
        return {
            "model": get_model_state_dict(self.module),
            "optimizer": get_optimizer_state_dict(self.module, self.optimizer),
        }

    def save(self, directory: str) -> None:
        """Sharded DCP checkpoint of this group (one file per dp rank), coordinated inside the group."""
        dcp.save(self._state(), checkpoint_id=directory, process_group=self.mesh["dp"].get_group())
        if self.topo.dp_rank == 0:  # the schedule is the same on every rank of the group
            torch.save(self.scheduler.state_dict(), Path(directory) / SCHEDULER_FILE)

    def load(self, directory: str) -> None:
        if not (Path(directory) / SCHEDULER_FILE).is_file():
            raise FileNotFoundError(f"no FSDP checkpoint under {directory}")
        state = self._state()
        dcp.load(state, checkpoint_id=directory, process_group=self.mesh["dp"].get_group())
        set_model_state_dict(self.module, state["model"])
        set_optimizer_state_dict(self.module, self.optimizer, state["optimizer"])
        self.scheduler.load_state_dict(torch.load(Path(directory) / SCHEDULER_FILE, weights_only=False))
