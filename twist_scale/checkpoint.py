"""Atomic, verified checkpoints at round boundaries.

Every rank writes into a hidden temporary directory and checksums the files it wrote; rank 0 gathers
the digests into manifest.json and renames the directory into place. A directory without a manifest,
or whose files do not match it, is reported and skipped on resume — never loaded; every rank checks
its share of the files. Each rank's I/O grows with what it owns, not with the world, and the ranks
wait for each other's I/O under `--checkpoint.timeout_s` (a group of its own), not the collective
timeout: a slow shared file system is not a hung rank.

A checkpoint resumes at another world (G'×R' instead of G×R) when every stateful component can
reshard itself (`load_resharded`): a rank opens only the old rank files whose pieces meet its own,
memory-mapped, so it reads only the parts it needs. Engine files are written only where the engine
holds the model's only copy (a dense run); a TwIST run's dispatch rewrites its engines from the
central model, whose shards are in the rank files, so its checkpoint holds no engine weights or
moments (they fit one layout anyway).
"""

from __future__ import annotations

import datetime
import json
import logging
import random
import shutil
from collections.abc import Callable, Mapping, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
import torch.distributed as dist

from twist_scale.atomic import atomic_directory, temp_sibling
from twist_scale.checkpoint_manifest import MANIFEST, complete_checkpoints, file_digests, verify
from twist_scale.config import CheckpointConfig
from twist_scale.topology import Topology

log = logging.getLogger(__name__)


def rng_state() -> dict[str, Any]:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


class Stateful(Protocol):
    def state_dict(self) -> Any: ...

    def load_state_dict(self, state: Any) -> None: ...


@runtime_checkable
class Reshardable(Stateful, Protocol):
    def load_resharded(self, states: list[Any], old_world: int) -> None:
        """Restore from the states every rank of a world of `old_world` saved (lazily loaded)."""


class EngineFiles(Protocol):
    """An engine checkpoints itself into a directory its group shares (ZeRO and FSDP shard the files)."""

    def save(self, directory: str) -> None: ...

    def load(self, directory: str) -> None: ...


class RngState:
    """The torch, numpy and Python generators, as one stateful component."""

    def state_dict(self) -> dict[str, Any]:
        return rng_state()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        set_rng_state(state)

    def load_resharded(self, states: list[dict[str, Any]], old_world: int) -> None:
        """Keep the seeded generators: ranks of a new layout have no old ones that belong to them."""


class OldRankStates(Sequence):
    """One component's state in each rank file of an older world, a file opened (memory-mapped) the first
    time any component reads it: a rank resharding opens the old ranks whose pieces meet its own (about
    W_old / W of them) and rank 0's (the data position), not all W_old."""

    def __init__(self, path: Path, old_world: int, component: str, opened: dict[int, dict[str, Any]]) -> None:
        self.path, self.old_world, self.component, self.opened = path, old_world, component, opened

    def __len__(self) -> int:
        return self.old_world

    def __getitem__(self, rank: int) -> Any:  # noqa: ANN401 - whatever the component saved
        if not 0 <= rank < self.old_world:
            raise IndexError(rank)
        if rank not in self.opened:
            self.opened[rank] = torch.load(self.path / f"rank_{rank:05d}.pt", weights_only=False, mmap=True)
        return self.opened[rank][self.component]


class Checkpointer:
    """Saves a run's stateful components per rank and its engine per group, at round boundaries."""

    def __init__(
        self,
        root: Path,
        rank: int,
        keep_last: int,
        device: torch.device,
        every_rounds: int = 0,
        last_round: int = 0,
        group: int = 0,
        layout: tuple[int, int] = (1, 1),
        io_group: dist.ProcessGroup | None = None,
    ) -> None:
        self.root, self.rank, self.group, self.keep_last, self.device = root, rank, group, keep_last, device
        self.every_rounds, self.last_round = every_rounds, last_round
        self.layout = layout  # (world size, groups) of this run
        self.io_group = io_group  # the ranks wait for each other's I/O in it (None: the default group)

    @classmethod
    def for_run(cls, root: Path, topo: Topology, cfg: CheckpointConfig, last_round: int) -> Checkpointer:
        layout = (topo.world_size, topo.groups)
        io_group = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=cfg.timeout_s))
        return cls(
            root, topo.rank, cfg.keep_last, topo.device, cfg.every_rounds, last_round, topo.group, layout, io_group
        )

    def save_run(
        self,
        round_: int,
        components: Mapping[str, Stateful],
        engine: EngineFiles | None,
        meta: dict[str, Any],
        finite: bool = True,
    ) -> Path:
        """Every component's state into rank_<rank>.pt, the engine (if any) into group_<group>/ (see `save`)."""

        def write(directory: Path) -> None:
            state = {"round": round_} | {name: c.state_dict() for name, c in components.items()}
            torch.save(state, directory / f"rank_{self.rank:05d}.pt")
            if engine is not None:
                group_dir = directory / f"group_{self.group:04d}"
                group_dir.mkdir(exist_ok=True)
                engine.save(str(group_dir))

        return self.save(round_, write, meta, finite)

    def load_run(self, path: Path, components: Mapping[str, Stateful], engine: EngineFiles | None) -> tuple[int, bool]:
        """Restore what `save_run` wrote: (the round it was written at, whether the world was another)."""
        meta = json.loads((path / MANIFEST).read_text())
        saved = (meta["world_size"], meta["groups"])
        if saved == self.layout:
            state = torch.load(path / f"rank_{self.rank:05d}.pt", weights_only=False)
            for name, component in components.items():
                component.load_state_dict(state[name])
            if engine is not None:
                engine.load(str(path / f"group_{self.group:04d}"))
            return state["round"], False
        fixed = [name for name, c in components.items() if not isinstance(c, Reshardable)]
        if fixed:
            raise ValueError(
                f"checkpoint {path} was written by {saved[0]} processes in {saved[1]} group(s), and this run has "
                f"{self.layout[0]} in {self.layout[1]}; its {', '.join(fixed)} cannot be resharded (a dense run "
                f"resumes only at its own world): launch {saved[0]} processes with --twist.groups {saved[1]}"
            )
        opened: dict[int, dict[str, Any]] = {}
        for name, component in components.items():
            component.load_resharded(OldRankStates(path, saved[0], name, opened), saved[0])
        return OldRankStates(path, saved[0], "round", opened)[0], True

    def due(self, round_: int) -> bool:
        """Every `every_rounds` rounds (0: never) and always after the last one."""
        return round_ == self.last_round or bool(self.every_rounds and round_ % self.every_rounds == 0)

    def _name(self, round_: int) -> str:
        return f"round_{round_:06d}"

    def save(self, round_: int, write: Callable[[Path], None], meta: dict[str, Any], finite: bool = True) -> Path:
        """`write(tmp_dir)` runs on every rank (collectively); the result appears atomically.

        `finite` is False when some rank holds a NaN or inf weight (the same answer on every rank):
        nothing is written, so the newest checkpoint stays a good one.
        """
        if not finite:
            raise FloatingPointError(
                "the weights hold NaN or inf; refusing to overwrite good checkpoints with them (the newest "
                "valid one is intact). Lower --optim.lr or set --optim.grad_clip, then resume."
            )
        final = self.root / self._name(round_)
        # rank 0 creates the directory and renames it into place once its manifest is written
        with atomic_directory(final) if self.rank == 0 else nullcontext(temp_sibling(final)) as tmp:
            dist.barrier(group=self.io_group)
            write(tmp)
            dist.barrier(group=self.io_group)
            digests = file_digests(tmp, self._own_files(tmp))
            world = dist.get_world_size(self.io_group)
            gathered: list[dict[str, str]] | None = [{} for _ in range(world)] if self.rank == 0 else None
            dist.gather_object(digests, gathered, dst=0, group=self.io_group)
            if self.rank == 0:
                files = dict(sorted(kv for d in gathered for kv in d.items()))
                (tmp / MANIFEST).write_text(json.dumps({"round": round_, "files": files, **meta}, indent=1))
        dist.barrier(group=self.io_group)
        if self.rank == 0:  # the others go on meanwhile
            for old in self.complete()[: -self.keep_last]:
                shutil.rmtree(old, ignore_errors=True)
        return final

    def _own_files(self, directory: Path) -> list[Path]:
        """The files this rank checksums: its rank file and its turn of its group's engine files; rank 0
        also any other file at the top (what a caller of `save` wrote)."""
        world, groups = self.layout
        per_group, position = world // groups, self.rank % (world // groups)
        engine = sorted(p for p in (directory / f"group_{self.group:04d}").rglob("*") if p.is_file())
        own = [p for p in [directory / f"rank_{self.rank:05d}.pt"] if p.is_file()] + engine[position::per_group]
        if self.rank == 0:
            own += [p for p in directory.iterdir() if p.is_file() and not p.name.startswith("rank_")]
        return own

    def complete(self) -> list[Path]:
        return complete_checkpoints(self.root)

    def latest_valid(self) -> Path | None:
        """The newest intact checkpoint: every rank checks its share of each candidate's files, newest first."""
        candidates: list[Any] = [sorted(self.root.glob("round_*"), reverse=True) if self.rank == 0 else None]
        dist.broadcast_object_list(candidates, src=0, group=self.io_group)
        world = dist.get_world_size(self.io_group)
        for candidate in candidates[0]:
            problem = verify(candidate, (self.rank, world))
            bad = torch.tensor([problem is not None], dtype=torch.int64)
            dist.all_reduce(bad, op=dist.ReduceOp.MAX, group=self.io_group)
            if not bad.item():
                return candidate
            if problem is not None and (self.rank == 0 or problem.startswith(("missing file", "checksum"))):
                log.warning("skipping checkpoint %s: %s", candidate, problem)  # rank 0 says what all ranks see
        return None
