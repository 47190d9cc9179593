"""FSDP2 engine under a real torchrun: read/write against a single-process oracle, and TwIST runs
that must reproduce the DeepSpeed ZeRO-1 engine's losses step for step.

Run as a script (`torchrun --nproc_per_node 2 tests/test_fsdp.py DIR`) this file is the worker of
`test_engine_matches_local_oracle`.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest
from conftest import TRAIN, run_deepspeed, run_torchrun, tiny_args

pytestmark = pytest.mark.slow


def loss_history(out_dir: Path) -> list[tuple[int, float]]:
    """(step, train/loss) pairs of the run's MLflow run, from the sqlite store in its out_dir."""
    from mlflow.tracking import MlflowClient

    from twist_scale.tracking import default_uri

    client = MlflowClient(default_uri(out_dir))
    run_id = (out_dir / "mlflow_run_id").read_text().strip()
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, "train/loss"))


def test_engine_matches_local_oracle(tmp_path):
    """Two ranks fed the same batch average to that batch's gradient: FSDP must equal LocalEngine."""
    run_torchrun(2, __file__, [str(tmp_path)], timeout=240)


@pytest.mark.parametrize(
    ("layout", "resume"),
    [
        # Two groups of one rank, aggregation across them.
        ({"twist__groups": 2, "twist__kappa": 0.5}, False),
        # One group sharded over two ranks, with uneven shards (ceil(0.3 * 128) = 39 MLP rows),
        # optimizer moments carried through dispatch/aggregation, and a resume.
        (
            {
                "twist__groups": 1,
                "twist__kappa": 0.3,
                "twist__allow_uncovered": "true",
                "twist__optimizer_state": "aggregate",
            },
            True,
        ),
    ],
    ids=["G2xR1", "G1xR2-uneven-moments-resume"],
)
def test_twist_losses_match_deepspeed(tmp_path, layout, resume):
    """Same seed and config: the FSDP2 and DeepSpeed ZeRO-1 engines give the same TwIST losses.

    With `resume`, the FSDP run is then resumed from its round-2 checkpoint (the round-3 one
    removed, as if the job had died): the replayed round must give the same losses again, which
    checks the sharded save/load and that a resumed run keeps logging into the same MLflow run.
    """
    common = {**layout, "eval__every_rounds": 0}
    ds_dir, fsdp_dir = tmp_path / "ds", tmp_path / "fsdp"
    run_deepspeed(2, TRAIN, tiny_args(ds_dir, parallel__engine="deepspeed", **common), timeout=300)
    run_torchrun(2, TRAIN, tiny_args(fsdp_dir, parallel__engine="fsdp", **common), timeout=300)
    steps = list(range(1, 10))
    if resume:
        shutil.rmtree(fsdp_dir / "checkpoints" / "round_000003")
        resumed = run_torchrun(2, TRAIN, tiny_args(fsdp_dir, parallel__engine="fsdp", **common), timeout=300)
        assert "resumed from" in resumed.stdout + resumed.stderr
        steps = [1, 2, 3, 4, 5, 6, 7, 7, 8, 8, 9, 9]  # round 3 logged by both attempts

    ds = dict(loss_history(ds_dir))
    fsdp = loss_history(fsdp_dir)
    assert sorted(ds) == list(range(1, 10))
    assert [s for s, _ in fsdp] == steps
    for step, value in fsdp:
        assert value == pytest.approx(ds[step], rel=1e-4, abs=1e-5), f"step {step}: {value} vs deepspeed {ds[step]}"


# ---------------------------------------------------------------------------------------- worker
def _worker(out: Path) -> None:
    """Write, train, read back, reset, save/load: each checked against LocalEngine."""
    import copy

    import torch
    import torch.distributed as dist
    from transformers import LlamaConfig, LlamaForCausalLM

    from twist_scale.config import RunConfig
    from twist_scale.distributed import init_distributed
    from twist_scale.engines.fsdp_engine import FSDPEngine
    from twist_scale.engines.local import LocalEngine
    from twist_scale.topology import Topology

    init_distributed("gloo")
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
    local = LocalEngine(reference, cfg)
    assert set(fsdp.params) == set(local.params)

    gen = torch.Generator().manual_seed(1)  # the same values on both ranks
    batch = torch.randint(0, config.vocab_size, (2, 16), generator=gen)

    def write_everything() -> None:
        """As dispatch does: new weights and moments, written into both engines."""
        for name, p in local.params.items():
            value = torch.randn(p.shape, generator=gen) * 0.05
            fsdp.write(name, value)
            local.write(name, value)
            assert torch.equal(fsdp.read(name), value), name
            for key in ("exp_avg", "exp_avg_sq"):
                moment = torch.rand(p.shape, generator=gen) * 1e-3
                fsdp.write_state(name, key, moment)
                local.write_state(name, key, moment)
                assert torch.equal(fsdp.read_state(name, key), moment), (name, key)

    def train_and_compare() -> None:
        for _ in range(2):
            assert fsdp.train_step(batch) == pytest.approx(local.train_step(batch), rel=1e-5)
        assert fsdp.lr() == local.lr()
        for name in local.params:
            torch.testing.assert_close(fsdp.read(name), local.read(name), rtol=1e-5, atol=1e-6, msg=name)
            for key in ("exp_avg", "exp_avg_sq"):
                moment, expected = fsdp.read_state(name, key), local.read_state(name, key)
                torch.testing.assert_close(moment, expected, rtol=1e-5, atol=1e-8)

    write_everything()  # before the first step: the optimizer state does not exist yet
    train_and_compare()
    write_everything()  # into existing state, as every later round's dispatch does
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
    assert fsdp.train_step(batch) == pytest.approx(local.train_step(batch), rel=1e-5)
    dist.destroy_process_group()


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))
