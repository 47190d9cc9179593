"""Stop every rank within seconds when the user stops the run, however they do it.

Three ways a run is stopped, one outcome (each rank raises `Interrupted` in its main thread, the
trainer marks the MLflow run KILLED, and rank 0 prints how to resume):
- Ctrl-C in the terminal: SIGINT reaches every process of the foreground group;
- SIGINT or SIGTERM to one rank (a scheduler, `kill`): that rank stops; the launcher sees it exit and
  stops the others (DeepSpeed's launch and torchrun both do), which then stop the same way;
- SIGINT or SIGTERM to the launcher's PID alone: `deepspeed`'s runner exits without telling its
  `deepspeed.launcher.launch` child, whose ranks would train on, orphaned. So every rank watches the
  outermost launcher above it and stops itself once that process is gone.
Checkpoints are written aside and renamed (`atomic`), so stopping mid-write leaves none half-made.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time

import psutil

log = logging.getLogger(__name__)

LAUNCHER_SCRIPTS = {"deepspeed", "torchrun"}
LAUNCHER_MODULES = {"deepspeed.launcher.runner", "deepspeed.launcher.launch", "torch.distributed.run"}
POLL_S = 1.0
GRACE_S = 10.0  # for the main thread to take the signal; stuck in a collective's C++ loop, it never does
_stopping = threading.Event()  # the main thread took a stop signal
_launcher_gone = threading.Event()
_watched: list[psutil.Process] = []  # the launcher `install` found above this rank, if any


class Interrupted(KeyboardInterrupt):
    """The user stopped the run; `reason` says how."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _raise(signum: int, frame: object) -> None:
    _stopping.set()
    raise Interrupted("the launcher exited" if _launcher_gone.is_set() else signal.Signals(signum).name)


def stop_reason(error: BaseException) -> str | None:
    """Why the run stopped, when `error` is part of a stop: the signal, or a collective failing because
    a peer already stopped for it (the launcher is gone). None: a real failure."""
    if isinstance(error, Interrupted):
        return error.reason
    gone = _launcher_gone.is_set() or any(not _alive(launcher) for launcher in _watched)
    return "the launcher exited" if gone else None


def _entry_point(command: list[str]) -> str:
    """The script's name or the module a Python command line runs ('' for anything else)."""
    args = iter(command[1:])
    for arg in args:
        if arg == "-m":
            return next(args, "")
        if not arg.startswith("-"):
            return os.path.basename(arg)
    return ""


def _is_launcher(process: psutil.Process) -> bool:
    try:
        entry = _entry_point(process.cmdline())
    except psutil.Error:
        return False
    return entry in LAUNCHER_SCRIPTS or entry in LAUNCHER_MODULES


def launcher_process() -> psutil.Process | None:
    """The outermost of the launchers directly above this rank (deepspeed's runner above its launch,
    or torchrun); the walk stops at the first other process (a shell, srun's step daemon, pytest)."""
    found = None
    for parent in psutil.Process().parents():
        if not _is_launcher(parent):
            break
        found = parent
    return found


def _alive(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _watch(launcher: psutil.Process) -> None:
    while _alive(launcher):
        time.sleep(POLL_S)
    log.warning("the launcher (pid %d) is gone: stopping this rank", launcher.pid)
    _launcher_gone.set()
    os.kill(os.getpid(), signal.SIGTERM)  # handled in the main thread, like a SIGTERM from outside
    if not _stopping.wait(GRACE_S):  # waiting on a peer that already stopped: nothing left to save
        os._exit(130)


def install() -> None:
    """SIGINT and SIGTERM raise `Interrupted`; a daemon thread stops this rank if its launcher exits."""
    signal.signal(signal.SIGINT, _raise)
    signal.signal(signal.SIGTERM, _raise)
    launcher = launcher_process()
    if launcher is not None:
        _watched.append(launcher)
        threading.Thread(target=_watch, args=(launcher,), name="launcher-watch", daemon=True).start()
