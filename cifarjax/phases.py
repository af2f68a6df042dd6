"""Where a process's time goes: named phases (data loading, compilation, feature extraction, training,
evaluation, checkpoints, plotting), each announced as it starts so progress never goes silent, and the
whole process's wall time, so the phases in summary.json add up to it."""
from __future__ import annotations

import contextlib
import os
import sys
import time
from collections import defaultdict
from typing import Optional


def process_start() -> float:
    """This process's start, as a `time.time()` value (Linux: from /proc; elsewhere: the first call)."""
    try:
        with open("/proc/self/stat") as f:
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return time.time() - uptime + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return _FIRST_CALL


_FIRST_CALL = time.time()


class Phases:
    """Accumulates seconds per phase; `with phases("training"):` times one. `announce` prints what starts."""

    def __init__(self, announce: bool = True):
        self.seconds = defaultdict(float)
        self.announce = announce
        self.started = process_start()

    @contextlib.contextmanager
    def __call__(self, name: str, message: Optional[str] = None):
        if message and self.announce:
            print(f"{message} ...", file=sys.stderr, flush=True)
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] += time.perf_counter() - start

    def add(self, name: str, seconds: float) -> None:
        self.seconds[name] += seconds

    def summary(self) -> dict:
        """{'phases': seconds per phase plus 'other' (start-up, imports, ...), 'process_seconds': the total}."""
        total = time.time() - self.started
        phases = {k: round(v, 2) for k, v in self.seconds.items()}
        phases["other"] = round(max(0.0, total - sum(self.seconds.values())), 2)
        return {"phases": phases, "process_seconds": round(total, 2)}
