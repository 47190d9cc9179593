"""What one cell of bench/data.py costs its process: status fields, sampled anonymous memory and CPU seconds.

Kept out of bench/data.py so that module holds the cells and the report; these read /proc and getrusage only.
"""

from __future__ import annotations

import resource
import threading
from pathlib import Path


def status_mb(field: str, pid: int | str = "self") -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/{pid}/status")


def _pss_anon_mb(pid: int) -> float:
    """Anonymous memory in proportion: a page a forked worker still shares with its parent counts once."""
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss_Anon:"):
                return int(line.split()[1]) / 1024
    except OSError:  # a worker that has just exited
        pass
    return 0.0


class AnonPeak:
    """Peak of Pss_Anon summed over this process and its tokenising workers, and the workers' VmHWM, sampled."""

    def __init__(self) -> None:
        import psutil

        self.me, self.peak, self.worker_hwm, self.stop = psutil.Process(), 0.0, 0.0, threading.Event()
        self.thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self.stop.wait(0.1):
            workers = self.me.children(recursive=True)
            self.peak = max(self.peak, sum(_pss_anon_mb(p.pid) for p in [self.me, *workers]))
            for worker in workers:
                try:
                    self.worker_hwm = max(self.worker_hwm, status_mb("VmHWM", worker.pid))
                except (OSError, RuntimeError):  # exited between the listing and the read
                    pass

    def __enter__(self) -> AnonPeak:
        self.base = _pss_anon_mb(self.me.pid)
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()


def cpu_s() -> float:
    """User and system seconds of this process and its reaped children (the tokenising workers, Rust threads too)."""
    return sum(
        u.ru_utime + u.ru_stime for u in map(resource.getrusage, (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
    )
