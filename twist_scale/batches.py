"""Deterministic (group, rank) sharding of a run's token blocks into batches.

Apart from the token files because the batch order depends on the blocks, the shard and the seed
alone: its position (epoch, batch) is what a checkpoint keeps and a resume at another world reshards.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from twist_scale.distill import StoredTeacher, TeacherBatch


class ShardedBatches:
    """Endless shuffled batches from shard `index` of `count` (blocks index, index+count, ...).

    Shards of different ranks are disjoint and together cover every block. The position
    (epoch, batch) is all a resume needs to continue the exact same sequence.
    """

    def __init__(self, blocks: np.ndarray, index: int, count: int, batch_size: int, seed: int) -> None:
        self.rows = np.arange(index, len(blocks), count)
        if len(self.rows) < batch_size:
            raise ValueError(
                f"data shard {index}/{count} has {len(self.rows)} blocks, fewer than one batch of {batch_size}; "
                "use more data, fewer ranks, or a smaller --data.micro_batch_size / --data.block_size"
            )
        self.blocks, self.batch_size, self.seed = blocks, batch_size, seed
        self.teacher: StoredTeacher | None = None  # --twist.distill stored: batches carry its top-k
        self.epoch, self.batch = 0, 0
        self._epoch_order: tuple[int, np.ndarray] | None = None  # (epoch, its order): one shuffle per epoch

    @property
    def batches_per_epoch(self) -> int:
        return len(self.rows) // self.batch_size

    def _order(self) -> np.ndarray:
        """The epoch's order, a function of (seed, epoch) alone: O(shard), so computed once per epoch."""
        return np.random.default_rng([self.seed, self.epoch]).permutation(self.rows)

    def _epoch_rows(self) -> np.ndarray:
        if self._epoch_order is None or self._epoch_order[0] != self.epoch:
            self._epoch_order = (self.epoch, self._order())
        return self._epoch_order[1]

    def __iter__(self) -> Iterator[torch.Tensor]:
        return self

    def __next__(self) -> torch.Tensor | TeacherBatch:
        if self.batch >= self.batches_per_epoch:
            self.epoch, self.batch = self.epoch + 1, 0
        rows = np.sort(self._epoch_rows()[self.batch * self.batch_size : (self.batch + 1) * self.batch_size])
        self.batch += 1
        input_ids = torch.from_numpy(np.asarray(self.blocks[rows], dtype=np.int64))
        return input_ids if self.teacher is None else self.teacher.batch(rows, input_ids)

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "batch": self.batch}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.batch = int(state["epoch"]), int(state["batch"])

    def load_resharded(self, states: list[dict[str, int]], old_world: int) -> None:
        """Continue at the fraction of an epoch the old world had reached (every rank steps in lockstep).

        The shards differ in another world, so the exact sequence cannot continue; the number of
        epochs seen, and so the data schedule, does.
        """
        old_batches = len(range(0, len(self.blocks), old_world)) // self.batch_size
        seen = int(states[0]["epoch"]) + int(states[0]["batch"]) / max(old_batches, 1)
        self.epoch = int(seen)
        self.batch = min(round((seen - self.epoch) * self.batches_per_epoch), self.batches_per_epoch)


def eval_batches(blocks: np.ndarray, index: int, count: int, batch_size: int, max_batches: int) -> list[torch.Tensor]:
    """A fixed list of validation batches for shard `index` of `count` (no shuffling).

    Every shard gets the same number of batches, as many as the shard with the fewest rows fills: under
    ZeRO-3 and FSDP a forward all-gathers inside the group, so a rank with one batch more than its
    peers would wait for them until the collective timeout.
    """
    rows = np.arange(index, len(blocks), count)
    batches = min(max_batches, len(blocks) // count // batch_size)
    return [
        torch.from_numpy(np.asarray(blocks[rows[i * batch_size : (i + 1) * batch_size]], dtype=np.int64))
        for i in range(batches)
    ]
