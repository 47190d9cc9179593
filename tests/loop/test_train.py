"""Whole runs of the loop on in-process gloo ranks (DeepSpeed engines), checked against oracles and the MLflow store."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
from helpers import assert_fp32_checkpoint, history, mlflow_run, tiny_args
from helpers.dist import train_on_ranks
from safetensors.torch import load_file


def test_kappa_one_sync_every_step_is_data_parallel(tmp_path):
    """G=2 groups holding every unit, averaging weights and momenta after each SGD step, equals
    2-rank data parallelism (mean of updates = update of the mean gradient): same losses."""
    common = dict(
        optim__name="sgd",
        optim__beta1=0.9,
        optim__grad_clip=0,
        optim__lr=0.05,
        twist__local_steps=1,
        twist__rounds=8,
        twist__kappa=1.0,
        twist__optimizer_state="aggregate",
        eval__every_rounds=4,
        checkpoint__every_rounds=0,
    )
    dense_dir = tmp_path / "dense"
    train_on_ranks(2, tiny_args(dense_dir, twist__groups=1, **common))
    train_on_ranks(2, tiny_args(tmp_path / "twist", twist__groups=2, **common))
    client, run = mlflow_run(dense_dir)
    dp = history(client, run, "train/loss")
    twist = history(*mlflow_run(tmp_path / "twist"), "train/loss")
    assert len(dp) == len(twist) == 8
    assert max(abs(a - b) for a, b in zip(dp, twist, strict=True)) < 1e-4, (dp, twist)
    assert sum(dp[-3:]) / 3 < sum(dp[:3]) / 3 - 0.1, dp  # and it learns

    # the dense run also checks tracking: MLflow holds its params, metrics and artifacts
    assert run.data.params["twist.groups"] == "1" and "perf/tokens_per_s" in run.data.metrics
    assert run.data.metrics["eval/ppl_kappa_1.00"] < 512  # below uniform over the vocabulary, an untrained model's
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.json", "tokenizer", "final"} <= artifacts
    assert json.loads((dense_dir / "config.json").read_text())["optim"]["name"] == "sgd"
    assert (dense_dir / "final" / "model.safetensors").exists()


def test_two_groups_of_two_ranks_train(tmp_path):
    """2 x 2 under ZeRO-2 in bf16: the engine trains in bf16, the central model stays fp32."""
    out = tmp_path / "twist4"
    ranks = train_on_ranks(
        4,
        tiny_args(
            out,
            twist__groups=2,
            twist__kappa=0.5,
            twist__rounds=4,
            twist__local_steps=3,
            parallel__ds_config="ds_configs/zero2.json",
            parallel__precision="bf16",
            twist__correction="scale",
        ),
    )
    client, run = mlflow_run(out)
    losses = history(client, run, "train/loss")
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.1, losses
    assert {"train/loss_group0", "train/loss_group1", "twist/sync_seconds", "eval/ppl_kappa_0.50"} <= set(
        run.data.metrics
    )
    assert run.data.metrics["twist/sync_bytes"] > 0
    assert (out / "checkpoints" / "round_000004" / "manifest.json").exists()
    assert_fp32_checkpoint(out / "final")
    # the run ends with what it reached and this run's next commands
    ppl = run.data.metrics["eval/ppl_kappa_0.50"]
    assert f"validation perplexity at kappa 0.50 (subnet): {ppl:.2f}" in ranks.output
    assert f"twist-export {out / 'final'} --kappa" in ranks.output


def norm_movement(final: Path) -> float:
    """How far the exported model's norm weights (all 1.0 at initialisation) moved, summed."""
    weights = {k: v for f in final.glob("*.safetensors") for k, v in load_file(f).items()}
    return sum(float((v - 1).abs().sum()) for k, v in weights.items() if "norm" in k)


def test_the_bf16_wire_carries_updates_smaller_than_half_a_bf16_ulp(tmp_path):
    """At lr 1e-5 a norm weight of 1.0 moves far less than half a bf16 ulp (2^-8) in a round: sent as a
    value it would round back to 1.0 every round; sent as the change since dispatch it adds up as over
    the fp32 wire."""
    common = dict(parallel__engine="local", twist__kappa=0.5, twist__allow_uncovered="true", optim__lr=1e-5)
    common |= dict(optim__warmup_steps=0, twist__rounds=3, twist__local_steps=3, eval__every_rounds=0)
    moved = {}
    for wire in ("fp32", "bf16"):
        train_on_ranks(1, tiny_args(tmp_path / wire, twist__wire_dtype=wire, **common))
        moved[wire] = norm_movement(tmp_path / wire / "final")
    assert moved["fp32"] > 0
    assert abs(moved["bf16"] - moved["fp32"]) <= 0.01 * moved["fp32"], moved


def test_accumulated_steps_train_as_one_larger_batch_and_resume(tmp_path):
    """2 micro-batches of 2 per optimizer step draw the same rows as one micro-batch of 4 (the sampler's
    order does not depend on the batch size): the same losses, step for step, under ZeRO-2 with H
    counting optimizer steps, the LR schedule on them and the tokens counted; a resume replays the
    last round's loss."""
    common = dict(twist__kappa=0.5, twist__allow_uncovered="true", twist__rounds=2, eval__every_rounds=0)
    common |= dict(parallel__ds_config="ds_configs/zero2.json", optim__grad_clip=0)
    whole, accumulated = tmp_path / "whole", tmp_path / "accumulated"
    train_on_ranks(1, tiny_args(whole, data__micro_batch_size=4, **common))
    train_on_ranks(1, tiny_args(accumulated, data__micro_batch_size=2, optim__grad_accum_steps=2, **common))
    expected = history(*mlflow_run(whole), "train/loss")
    got = history(*mlflow_run(accumulated), "train/loss")
    assert len(got) == len(expected) == 6, got  # 2 rounds x H = 3 optimizer steps
    assert max(abs(a - b) for a, b in zip(got, expected, strict=True)) < 1e-5, (got, expected)
    lrs = [history(*mlflow_run(d), "train/lr") for d in (whole, accumulated)]
    assert lrs[0] == lrs[1] and len(set(lrs[0])) == 2, lrs
    tokens = [json.loads((d / "final" / "twist.json").read_text())["tokens"] for d in (whole, accumulated)]
    assert tokens[0] == tokens[1] == 6 * 4 * 64, tokens

    shutil.rmtree(accumulated / "checkpoints" / "round_000002")  # as if the job died after round 1
    resumed = train_on_ranks(1, tiny_args(accumulated, data__micro_batch_size=2, optim__grad_accum_steps=2, **common))
    replayed = re.search(r"round 2/2 loss (\d+\.\d+)", resumed.output)
    assert "resumed from" in resumed.output and replayed is not None, resumed.output[-2000:]
    assert float(replayed[1]) == pytest.approx(expected[-1], abs=1e-4)
