"""Distillation for subnets: each group's loss adds a KL term toward a teacher's logits.

    loss = CE + weight · T² · KL(softmax(teacher / T) ‖ softmax(student / T))

T² keeps the term's gradient at the same scale whatever the temperature (Hinton et al., 2015); the term is
added to the cross-entropy rather than mixed with it, so a teacher equal to the student changes nothing:
KL 0 and today's gradients. Two teachers (`--twist.distill`):

- `central`: the full-width central model as of the round's dispatch (`assembly.CentralTeacher`): one
  no-grad forward per micro-batch in every group, in an engine of the run's kind that never steps, so
  under ZeRO-3 / FSDP2 it is sharded like the student and no rank holds it whole.
- `stored`: a pretrained teacher's top-k logits over the training blocks, computed once and memory-mapped
  from the data cache (`StoredTeacher`): training pays no teacher forward at all, the form that scales
  to 70B teachers. Both distributions are renormalised over the teacher's k tokens, so the stored term is
  exactly the online teacher's term on the kept logits (to fp16 rounding of the stored values).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from tqdm import tqdm

from twist_scale.atomic import atomic_file, atomic_write_text
from twist_scale.token_files import token_dtype

log = logging.getLogger(__name__)


class TeacherBatch(NamedTuple):
    """A training micro-batch with the stored teacher's top-k for each of its positions."""

    input_ids: torch.Tensor  # (B, T)
    ids: torch.Tensor  # (B, T, k) the teacher's k most likely next tokens
    logits: torch.Tensor  # (B, T, k) their logits


def kl_to_teacher(
    student: torch.Tensor, teacher: torch.Tensor, temperature: float, teacher_ids: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean over positions of KL(teacher ‖ student) at `temperature`, from logits (..., V).

    With `teacher_ids` (..., k), `teacher` holds the logits of those tokens only and the student's are
    taken at the same tokens: both distributions are renormalised over the k kept tokens."""
    student = student.float() / temperature
    if teacher_ids is not None:
        student = student.gather(-1, teacher_ids.to(student.device, torch.long))
    log_p = (teacher.to(student.device).float() / temperature).log_softmax(-1)
    log_q = student.log_softmax(-1)
    return (log_p.exp() * (log_p - log_q)).sum(-1).mean()


@dataclass
class Distiller:
    """Adds the distillation term to a group's loss and keeps both parts for the round's log."""

    weight: float
    temperature: float
    online: Callable[[torch.Tensor], torch.Tensor] | None = None  # input ids -> teacher logits (central)
    parts: list[tuple[float, float]] = field(default_factory=list)  # (CE, KL) of each micro-batch

    def loss(
        self, logits: torch.Tensor, cross_entropy: torch.Tensor, batch: torch.Tensor | TeacherBatch
    ) -> torch.Tensor:
        if isinstance(batch, TeacherBatch):
            kl = kl_to_teacher(logits, batch.logits, self.temperature, batch.ids)
        elif self.online is not None:
            kl = kl_to_teacher(logits, self.online(batch), self.temperature)
        else:
            raise ValueError("a stored-teacher run got a batch without the teacher's top-k")
        self.parts.append((cross_entropy.item(), kl.item()))
        return cross_entropy + self.weight * self.temperature**2 * kl

    def take_parts(self) -> tuple[float, float]:
        """Mean (CE, KL) since the last call (NaN for a round without a step)."""
        if not self.parts:
            return float("nan"), float("nan")
        ce, kl = (float(np.mean(part)) for part in zip(*self.parts, strict=True))
        self.parts.clear()
        return ce, kl


def input_ids_of(batch: torch.Tensor | TeacherBatch) -> torch.Tensor:
    return batch.input_ids if isinstance(batch, TeacherBatch) else batch


class StoredTeacher:
    """A teacher's top-k logits for the training blocks one rank trains on, computed once and memory-mapped.

    Rank `index` of `count` trains on blocks index, index + count, ... (`batches.ShardedBatches`), so each rank
    computes exactly its own rows, with no collective and no waiting on another rank, and writes them
    atomically: `ids-<index>.npy` (the token file's dtype) and `logits-<index>.npy` (fp16), (rows, T, k).
    The directory is keyed by the teacher, k, the token file, the block size and the world: another world
    (an elastic resume) computes its own rows anew.
    """

    def __init__(self, directory: Path, index: int, count: int) -> None:
        self.directory, self.index, self.count = directory, index, count
        self.ids, self.logits = (np.load(path, mmap_mode="r") for path in self.files(directory, index))

    @staticmethod
    def files(directory: Path, index: int) -> tuple[Path, Path]:
        """Rank `index`'s top-k ids and logits."""
        return directory / f"ids-{index:05d}.npy", directory / f"logits-{index:05d}.npy"

    def batch(self, rows: np.ndarray, input_ids: torch.Tensor) -> TeacherBatch:
        """The top-k of training blocks `rows` (this rank's, ascending), beside their `input_ids`."""
        if (rows % self.count != self.index).any():
            raise ValueError(f"rank {self.index} of {self.count} has no stored teacher for blocks {rows.tolist()}")
        at = rows // self.count
        ids = torch.from_numpy(np.asarray(self.ids[at], dtype=np.int64))
        return TeacherBatch(input_ids, ids, torch.from_numpy(np.asarray(self.logits[at], dtype=np.float32)))

    @staticmethod
    def directory_for(cache: Path, teacher: str, top_k: int, token_index: Path, block_size: int, count: int) -> Path:
        key = json.dumps([teacher, top_k, token_index.name, block_size, count]).encode()
        return cache / f"teacher-{hashlib.sha256(key).hexdigest()[:16]}"

    @classmethod
    def prepare(
        cls,
        directory: Path,
        teacher: str,
        top_k: int,
        blocks: np.ndarray,
        index: int,
        count: int,
        vocab_size: int,
        batch_size: int,
        device: torch.device,
    ) -> StoredTeacher:
        """This rank's stored top-k, computed with the teacher checkpoint if the cache lacks it."""
        ids_path, logits_path = cls.files(directory, index)
        if not (ids_path.exists() and logits_path.exists()):
            directory.mkdir(parents=True, exist_ok=True)
            ids, logits = _top_k_of(teacher, top_k, blocks[index::count], vocab_size, batch_size, device, index == 0)
            for path, value in ((ids_path, ids), (logits_path, logits)):
                with atomic_file(path) as f:
                    np.save(f, value)
            if index == 0:
                meta = {"teacher": teacher, "top_k": top_k, "block_size": blocks.shape[1], "world": count}
                atomic_write_text(directory / "teacher.json", json.dumps(meta, indent=2))
        return cls(directory, index, count)


def load_teacher(teacher: str, vocab_size: int, device: torch.device) -> torch.nn.Module:
    """The teacher checkpoint (bf16 on an accelerator, fp32 on the host), refused in one line if its
    vocabulary cannot score the run's tokens."""
    from transformers import AutoModelForCausalLM

    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    model = AutoModelForCausalLM.from_pretrained(teacher, dtype=dtype).to(device).eval()
    if model.config.vocab_size < vocab_size:
        raise ValueError(
            f"--twist.distill_teacher {teacher}: its vocabulary has {model.config.vocab_size} tokens, the run's "
            f"tokenizer {vocab_size}; the teacher must share the run's tokenizer"
        )
    return model


@torch.no_grad()
def _top_k_of(
    teacher: str, k: int, rows: np.ndarray, vocab_size: int, batch_size: int, device: torch.device, show: bool
) -> tuple[np.ndarray, np.ndarray]:
    """(rows, T, k) ids and fp16 logits of the teacher's k most likely next tokens at every position."""
    model = load_teacher(teacher, vocab_size, device)
    ids = np.empty((len(rows), rows.shape[1], k), dtype=token_dtype(vocab_size))
    logits = np.empty((len(rows), rows.shape[1], k), dtype=np.float16)
    for start in tqdm(range(0, len(rows), batch_size), desc="teacher top-k", disable=not show):
        input_ids = torch.from_numpy(np.asarray(rows[start : start + batch_size], dtype=np.int64)).to(device)
        values, top = model(input_ids=input_ids).logits[..., :vocab_size].float().topk(k, dim=-1)
        ids[start : start + len(input_ids)] = top.cpu().numpy()
        logits[start : start + len(input_ids)] = values.cpu().numpy()
    log.info("stored the teacher's top-%d logits of %d blocks", k, len(rows))
    return ids, logits
