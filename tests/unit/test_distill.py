"""Distillation's loss: a teacher equal to the student changes nothing, and the stored top-k teacher is the
online teacher on its kept logits."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from helpers.models import random_model

from twist_scale.config import ConfigError, RunConfig
from twist_scale.config_validate import _check_distillation
from twist_scale.distill import Distiller, StoredTeacher, TeacherBatch, kl_to_teacher


def _gradients(model: torch.nn.Module, loss: torch.Tensor) -> list[torch.Tensor]:
    model.zero_grad()
    loss.backward()
    return [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_a_teacher_equal_to_the_student_gives_zero_kl_and_todays_gradients(temperature):
    model = random_model("llama").train()
    input_ids = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    today = _gradients(model, model(input_ids=input_ids, labels=input_ids).loss)

    distiller = Distiller(weight=1.0, temperature=temperature, online=lambda ids: model(input_ids=ids).logits.detach())
    output = model(input_ids=input_ids, labels=input_ids)
    distilled = _gradients(model, distiller.loss(output.logits, output.loss, input_ids))
    ce, kl = distiller.take_parts()
    assert kl == pytest.approx(0.0, abs=1e-6) and ce == pytest.approx(output.loss.item())
    assert all(math.isnan(part) for part in distiller.take_parts())  # taken: a round without steps logs NaN
    for a, b in zip(distilled, today, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)

    # and a different teacher moves them: the term is not inert
    other = Distiller(1.0, temperature, online=lambda ids: torch.randn(*ids.shape, model.config.vocab_size))
    output = model(input_ids=input_ids, labels=input_ids)
    moved = _gradients(model, other.loss(output.logits, output.loss, input_ids))
    assert other.take_parts()[1] > 0.1
    assert max((a - b).abs().max().item() for a, b in zip(moved, today, strict=True)) > 1e-4


def test_kl_is_the_definition_on_the_full_vocabulary_and_on_a_kept_top_k():
    gen = torch.Generator().manual_seed(1)
    student, teacher, T = torch.randn(3, 5, 11, generator=gen), torch.randn(3, 5, 11, generator=gen), 1.5
    p, q = (teacher / T).softmax(-1), (student / T).softmax(-1)
    expected = (p * (p.log() - q.log())).sum(-1).mean()
    torch.testing.assert_close(kl_to_teacher(student, teacher, T), expected)
    ids = teacher.topk(4, dim=-1).indices
    p_k, q_k = (teacher.gather(-1, ids) / T).softmax(-1), (student.gather(-1, ids) / T).softmax(-1)
    expected = (p_k * (p_k.log() - q_k.log())).sum(-1).mean()
    torch.testing.assert_close(kl_to_teacher(student, teacher.gather(-1, ids), T, ids), expected)


def test_the_stored_top_k_teacher_reproduces_the_online_teachers_loss_on_the_kept_logits(tmp_path):
    teacher = random_model("llama").eval()
    teacher.save_pretrained(tmp_path / "teacher")
    vocab, k, T = teacher.config.vocab_size, 8, 2.0
    blocks = np.random.default_rng(0).integers(0, vocab, (10, 16)).astype(np.uint16)
    cpu = torch.device("cpu")
    stored = StoredTeacher.prepare(tmp_path / "cache", str(tmp_path / "teacher"), k, blocks, 1, 2, vocab, 3, cpu)
    rows = np.array([3, 7])  # rank 1 of 2 trains on the odd blocks
    input_ids = torch.from_numpy(blocks[rows].astype(np.int64))
    batch = stored.batch(rows, input_ids)

    with torch.no_grad():
        online = teacher(input_ids=input_ids).logits
    top = online.topk(k, dim=-1)
    assert torch.equal(batch.ids, top.indices)
    student = random_model("llama", seed=5)(input_ids=input_ids).logits.detach()
    torch.testing.assert_close(
        kl_to_teacher(student, batch.logits, T, batch.ids),
        kl_to_teacher(student, top.values, T, top.indices),
        rtol=2e-3,
        atol=1e-5,
    )  # fp16 storage of the logits
    # a second start reads the files instead of running the teacher again
    again = StoredTeacher.prepare(tmp_path / "cache", "no such teacher", k, blocks, 1, 2, vocab, 3, cpu)
    assert torch.equal(again.batch(rows, input_ids).logits, batch.logits)
    with pytest.raises(ValueError, match="no stored teacher for blocks"):
        stored.batch(np.array([2]), input_ids[:1])
    # the distiller takes the stored form from the batch
    distiller = Distiller(0.5, T)
    loss = distiller.loss(student, torch.tensor(3.0), TeacherBatch(input_ids, batch.ids, batch.logits))
    assert loss.item() == pytest.approx(3.0 + 0.5 * T**2 * distiller.take_parts()[1], rel=1e-6)


def test_distillation_flags_that_cannot_run_are_refused():
    cfg = RunConfig()
    cfg.twist.distill = "central"
    with pytest.raises(ConfigError, match="a dense run has no central model"):
        _check_distillation(cfg)
    cfg.twist.kappa, cfg.twist.groups, cfg.twist.distill = 0.5, 2, "stored"
    with pytest.raises(ConfigError, match="needs a teacher"):
        _check_distillation(cfg)
    cfg.twist.distill_teacher, cfg.twist.distill_temperature = "some/dir", 0.0
    with pytest.raises(ConfigError, match="distill_temperature 0.0"):
        _check_distillation(cfg)
