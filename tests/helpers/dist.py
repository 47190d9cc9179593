"""Run a function on N ranks of a real gloo process group, each rank its own spawned process.

`run_on_ranks(fn, world, *args)` calls `fn(rank, world, *args)` on every rank, with the launcher's
environment (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT) set, so DeepSpeed and FSDP
engines find the group as they would under `deepspeed` or `torchrun`. The worker's module is loaded
in each rank with pytest's assertion rewriting, and a failure on any rank fails the calling test
with that rank's traceback and assertion message.
"""

from __future__ import annotations

import ast
import datetime
import inspect
import os
import pickle
import sys
import time
import types
from collections.abc import Callable
from pathlib import Path

import pytest
import torch.multiprocessing as mp
from torch.multiprocessing.spawn import ProcessExitedException, ProcessRaisedException

from helpers import free_port, leaked_shared_memory

RANK_ENV = {"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _load(path: str, module_name: str) -> types.ModuleType:
    """Import the worker's module from its file, its asserts rewritten as pytest rewrites test modules."""
    from _pytest.assertion.rewrite import rewrite_asserts

    source = Path(path).read_bytes()
    tree = ast.parse(source, filename=path)
    rewrite_asserts(tree, source, path)
    module = types.ModuleType(module_name)
    module.__file__ = path
    sys.modules[module_name] = module
    exec(compile(tree, path, "exec", dont_inherit=True), module.__dict__)
    return module


def _rank(rank: int, world: int, port: int, path: str, module_name: str, qualname: str, args: tuple) -> None:
    """One rank: environment, process group, the worker, then the group destroyed."""
    os.environ.update(RANK_ENV)
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    import torch
    import torch.distributed as dist

    from twist_scale.distributed import close_distributed, release_shared_memory

    torch.set_num_threads(1)
    fn = _load(path, module_name)
    for part in qualname.split("."):
        fn = getattr(fn, part)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=120),
    )
    try:
        fn(rank, world, *args)
    except BaseException:
        # No teardown before the traceback is written: peers must not fail first on a closed group.
        release_shared_memory(rank)
        raise
    dist.barrier()  # a rank that returns early must not tear the group down under the others
    close_distributed()  # destroys the group and DeepSpeed's CPU all-reduce workspace


def _failures(error_files: list[str]) -> dict[int, str]:
    """Each failed rank's traceback, as torch.multiprocessing wrote it."""
    found = {}
    for rank, path in enumerate(error_files):
        if path and os.path.exists(path):
            found[rank] = pickle.loads(Path(path).read_bytes())
    return found


def run_on_ranks(fn: Callable[..., object], world: int, *args: object, timeout: float = 600) -> None:
    """Call `fn(rank, world, *args)` on `world` spawned ranks of a gloo group on 127.0.0.1.

    `fn` must be a module-level function; `args` must pickle. Fails the calling test with every failed
    rank's traceback, or after `timeout` seconds, with every rank still running killed.
    """
    path = inspect.getsourcefile(fn)
    assert path is not None and "<locals>" not in fn.__qualname__, f"{fn!r} must be a module-level function"
    port = free_port()
    context = mp.start_processes(
        _rank,
        args=(world, port, os.path.abspath(path), fn.__module__, fn.__qualname__, args),
        nprocs=world,
        join=False,
        start_method="spawn",
    )
    deadline = time.monotonic() + timeout
    try:
        while not context.join(timeout=max(0.0, deadline - time.monotonic())):
            if time.monotonic() >= deadline:
                pytest.fail(f"{fn.__qualname__} on {world} ranks still running after {timeout:.0f} s", pytrace=False)
    except (ProcessRaisedException, ProcessExitedException) as err:
        failures = _failures(context.error_files) or {err.error_index: str(err)}
        report = "".join(f"\n-- rank {rank} of {world}:\n{trace}" for rank, trace in sorted(failures.items()))
        pytest.fail(f"{fn.__qualname__} failed on rank(s) {sorted(failures)}:{report}", pytrace=False)
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
                process.join()
        for path in context.error_files:
            if path and os.path.exists(path):
                os.unlink(path)
    leaked = leaked_shared_memory(port)
    assert not leaked, f"the ranks left DeepSpeed's all-reduce workspaces in /dev/shm: {leaked}"
