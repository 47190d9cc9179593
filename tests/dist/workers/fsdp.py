"""Run on 2 ranks by `helpers.dist.run_on_ranks`: the FSDP2 engine against the single-process SingleProcessEngine."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from twist_scale.config import RunConfig
from twist_scale.engines.fsdp_engine import FSDPEngine
from twist_scale.engines.single_process import SingleProcessEngine
from twist_scale.topology import Topology


def check_against_local(rank: int, world: int, out: str) -> None:
    """Write, train, read back, reset, save/load: each checked against SingleProcessEngine."""
    torch.manual_seed(0)
    # Odd sizes everywhere, so every dim-0 shard is uneven over two ranks (FSDP pads them).
    config = LlamaConfig(
        vocab_size=101, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=2
    )
    model = LlamaForCausalLM(config)
    reference = copy.deepcopy(model)
    cfg = RunConfig()
    cfg.optim.lr, cfg.optim.warmup_steps, cfg.optim.grad_clip = 1e-2, 0, 0.5  # clipping active
    fsdp = FSDPEngine(model, cfg, Topology.from_dist(groups=1))
    local = SingleProcessEngine(reference, cfg)
    assert set(fsdp.params) == set(local.params)

    gen = torch.Generator().manual_seed(1)  # the same values on both ranks
    batch = torch.randint(0, config.vocab_size, (2, 16), generator=gen)

    def write_everything(sharded: bool) -> None:
        """As dispatch does: new weights and moments, written into both engines (into FSDP whole, or
        only this rank's `shard_range` of each, as the packed dispatch sends them)."""

        def write_fsdp(name: str, key: str, value: torch.Tensor) -> None:
            if sharded:
                lo, hi = fsdp.shard_range(value.shape, rank)
                fsdp.write_shard(name, key, value.flatten()[lo:hi])
            elif key:
                fsdp.write_state(name, key, value)
            else:
                fsdp.write(name, value)

        for name, p in local.params.items():
            value = torch.randn(p.shape, generator=gen) * 0.05
            write_fsdp(name, "", value)
            local.write(name, value)
            assert torch.equal(fsdp.read(name), value), name
            for key in ("exp_avg", "exp_avg_sq"):
                moment = torch.rand(p.shape, generator=gen) * 1e-3
                write_fsdp(name, key, moment)
                local.write_state(name, key, moment)
                assert torch.equal(fsdp.read_state(name, key), moment), (name, key)

    def train_and_compare() -> None:
        for _ in range(2):
            assert fsdp.train_step([batch]) == pytest.approx(local.train_step([batch]), rel=1e-5)
        assert fsdp.lr() == local.lr()
        for name in local.params:
            torch.testing.assert_close(fsdp.read(name), local.read(name), rtol=1e-5, atol=1e-6, msg=name)
            for key in ("exp_avg", "exp_avg_sq"):
                moment, expected = fsdp.read_state(name, key), local.read_state(name, key)
                torch.testing.assert_close(moment, expected, rtol=1e-5, atol=1e-8)
        for name in local.params:  # what aggregation sends: this rank's shard, read in place
            lo, hi = fsdp.shard_of(name)
            assert (lo, hi) == fsdp.shard_range(fsdp.params[name].shape, rank), name
            assert torch.equal(fsdp.read_shard(name), fsdp.read(name).flatten()[lo:hi]), name
            assert torch.equal(fsdp.read_shard(name, "exp_avg"), fsdp.read_state(name, "exp_avg").flatten()[lo:hi])

    write_everything(sharded=True)  # before the first step: the optimizer state does not exist yet
    train_and_compare()
    write_everything(sharded=False)  # into existing state, as every later round's dispatch does
    train_and_compare()
    write_everything(sharded=True)
    train_and_compare()

    saved = {name: fsdp.read(name) for name in fsdp.params}
    fsdp.save(str(out))
    fsdp.reset_optimizer_state()
    assert all(not fsdp.read_state(n, "exp_avg").any() for n in fsdp.params)
    for name, value in saved.items():
        fsdp.write(name, torch.zeros_like(value))
    fsdp.load(str(out))
    for name, value in saved.items():
        assert torch.equal(fsdp.read(name), value), name
        torch.testing.assert_close(fsdp.read_state(name, "exp_avg"), local.read_state(name, "exp_avg"))
    assert fsdp.train_step([batch]) == pytest.approx(local.train_step([batch]), rel=1e-5)
