"""Run a function on N ranks of a real gloo process group, each rank its own process.

`run_on_ranks(fn, world, *args)` calls `fn(rank, world, *args)` on every rank, with the launcher's
environment (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT) set, so DeepSpeed and FSDP
engines find the group as they would under `deepspeed` or `torchrun`. The worker's module is loaded
in each rank with pytest's assertion rewriting, and a failure on any rank fails the calling test
with that rank's traceback and assertion message.

Ranks are forked from a server that imported torch, transformers, DeepSpeed, MLflow and the trainer
once per test session: a rank starts in a fraction of a second instead of the ~10 s of imports a
spawned process or a launcher pays, which is what lets whole training runs be tests of the loop.
Each rank's stdout and stderr go to its own file (the server's streams belong to whichever test
started it), returned to the caller and quoted in failures.
"""

from __future__ import annotations

import ast
import datetime
import inspect
import multiprocessing
import os
import pickle
import sys
import tempfile
import time
import types
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch.multiprocessing as mp
from torch.multiprocessing.spawn import ProcessExitedException, ProcessRaisedException

from helpers import free_port, leaked_shared_memory

RANK_ENV = {"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
GRACE_S = 5  # after a rank fails, how long its peers get to exit before SIGTERM, then SIGKILL (a stopped rank)
# What every rank imports anyway, imported once by the fork server instead of once per rank.
PRELOAD = [
    *("torch", "torch.distributed", "transformers", "deepspeed", "mlflow"),
    *("twist_scale.trainer", "twist_scale.coverage", "helpers.dist"),
]


@dataclass
class RankRun:
    """What the ranks left behind: every rank's output (rank order) and, if allowed to fail, tracebacks."""

    output: str
    failures: dict[int, str]


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


def _redirect_output(log: str) -> None:
    """Point this process's stdout and stderr (the file descriptors, so C++ and children too) at `log`."""
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
        os.dup2(fd, stream.fileno())
    os.close(fd)


def _rank(
    rank: int, world: int, port: int, logs: str, group: bool, path: str, module_name: str, qualname: str, args: tuple
) -> None:
    """One rank: output file, environment, process group (unless the worker makes its own), the worker."""
    _redirect_output(os.path.join(logs, f"rank{rank}.log"))
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
    if group:
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
    if dist.is_initialized():
        dist.barrier()  # a rank that returns early must not tear the group down under the others
    close_distributed()  # destroys the group and DeepSpeed's CPU all-reduce workspace


def _failures(error_files: list[str]) -> dict[int, str]:
    """Each failed rank's traceback, as torch.multiprocessing wrote it."""
    found = {}
    for rank, path in enumerate(error_files):
        if path and os.path.exists(path) and os.path.getsize(path):  # empty: the rank was stopped, not failed
            found[rank] = pickle.loads(Path(path).read_bytes())
    return found


def _preload_fork_server() -> None:
    """Have the fork server, started by the first run of the session, import PRELOAD in the ranks' environment."""
    os.environ.update({k: v for k, v in RANK_ENV.items() if k != "OMP_NUM_THREADS"})
    multiprocessing.set_forkserver_preload(PRELOAD)


def run_on_ranks(
    fn: Callable[..., object],
    world: int,
    *args: object,
    timeout: float = 600,
    group: bool = True,
    may_fail: bool = False,
) -> RankRun:
    """Call `fn(rank, world, *args)` on `world` forked ranks of a gloo group on 127.0.0.1.

    `fn` must be a module-level function; `args` must pickle. With `group=False` the ranks get the
    launcher's environment but no process group (the worker initialises its own, as the trainer does).
    Fails the calling test with every failed rank's traceback and output, or after `timeout` seconds
    with every rank still running killed; with `may_fail` the failures are returned instead.
    """
    path = inspect.getsourcefile(fn)
    assert path is not None and "<locals>" not in fn.__qualname__, f"{fn!r} must be a module-level function"
    _preload_fork_server()
    port, logs = free_port(), tempfile.mkdtemp(prefix="twist-ranks-")
    context = mp.start_processes(
        _rank,
        args=(world, port, logs, group, os.path.abspath(path), fn.__module__, fn.__qualname__, args),
        nprocs=world,
        join=False,
        start_method="forkserver",
    )
    deadline, failures = time.monotonic() + timeout, {}
    try:
        while not context.join(timeout=max(0.0, deadline - time.monotonic()), grace_period=GRACE_S):
            if time.monotonic() >= deadline:
                pytest.fail(
                    f"{fn.__qualname__} on {world} ranks still running after {timeout:.0f} s\n{_output(logs, world)}",
                    pytrace=False,
                )
    except (ProcessRaisedException, ProcessExitedException) as err:
        failures = _failures(context.error_files) or {err.error_index: str(err)}
        if not may_fail:
            report = "".join(f"\n-- rank {rank} of {world}:\n{trace}" for rank, trace in sorted(failures.items()))
            pytest.fail(
                f"{fn.__qualname__} failed on rank(s) {sorted(failures)}:{report}\n{_output(logs, world)[-6000:]}",
                pytrace=False,
            )
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
                process.join()
        for error_file in context.error_files:
            if error_file and os.path.exists(error_file):
                os.unlink(error_file)
    leaked = leaked_shared_memory(port)
    if failures:  # a rank killed by a signal cannot unlink its workspace: 69 MB of RAM each, until reboot
        for path in leaked:
            path.unlink(missing_ok=True)
    else:
        assert not leaked, f"the ranks left DeepSpeed's all-reduce workspaces in /dev/shm: {leaked}"
    return RankRun(_output(logs, world), failures)


def _output(logs: str, world: int) -> str:
    parts = []
    for rank in range(world):
        log = Path(logs, f"rank{rank}.log")
        if log.exists():
            parts.append(f"-- output of rank {rank}:\n{log.read_text(errors='replace')}")
    return "\n".join(parts)


def _train(rank: int, world: int, argv: list[str], backend: str) -> None:
    """One rank of `twist-train argv`, as a launcher would start it (the trainer makes its own group)."""
    if backend == "strict":
        from helpers.strict_device import install

        install()
    from twist_scale.commands.train import main as train

    train(argv)


def train_on_ranks(world: int, argv: list[str], timeout: float = 300, may_fail: bool = False) -> RankRun:
    """`twist-train argv` on `world` in-process ranks: the real Trainer, engines and collectives, no launcher.

    The subject of most end-to-end tests is the loop, not the launcher; this runs the same code a
    `deepspeed` or `torchrun` launch runs, without ~25 s of launcher and imports per run.
    """
    backend = argv[argv.index("--parallel.backend") + 1] if "--parallel.backend" in argv else ""
    return run_on_ranks(_train, world, list(argv), backend, timeout=timeout, group=False, may_fail=may_fail)
