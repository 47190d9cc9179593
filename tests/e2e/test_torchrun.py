"""FSDP2 under a real `torchrun`: TwIST in bf16 with an fp32 central model. (FSDP2 against DeepSpeed, step
for step, in-process: loop/test_fsdp_train.py.)"""

from __future__ import annotations

from helpers import assert_fp32_checkpoint, launch, mlflow_run, tiny_args


def test_fsdp_trains_twist_in_bf16_with_an_fp32_central_model(tmp_path):
    out = tmp_path / "fsdp-bf16"
    overrides = dict(twist__groups=2, twist__kappa=0.75, twist__correction="scale", twist__rounds=2)
    launch("torchrun", 2, tiny_args(out, parallel__engine="fsdp", parallel__precision="bf16", **overrides))
    client, run = mlflow_run(out)
    assert run.data.metrics["eval/ppl_kappa_0.75"] < 512  # below uniform over the vocabulary
    assert_fp32_checkpoint(out / "final")
