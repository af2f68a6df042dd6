"""Where a process's time goes: its named phases, adding up to its wall time in summary.json (`Phases`), a fit's clock
(`Chrono`), and its peak memory. (Giving back the memory XLA's compiler frees: `cifarjax.cpu.process`.)"""
from __future__ import annotations

import contextlib
import os
import resource
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Optional


def process_start() -> float:
    """This process's start as a `time.time()` value (Linux: from /proc; elsewhere: this module's import)."""
    try:
        ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return time.time() - uptime + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return _FIRST_CALL


_FIRST_CALL = time.time()


def peak_memory_mb() -> float:
    """This process's peak resident memory in MB (Linux VmHWM: not inflated by a parent that forked it)."""
    try:
        with open("/proc/self/status") as f:
            return round(int(next(line for line in f if line.startswith("VmHWM:")).split()[1]) / 1024, 1)
    except (OSError, StopIteration):
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return round(peak / (1024 * 1024 if sys.platform == "darwin" else 1024), 1)


class Phases:
    """Accumulates seconds per phase; `with phases("training"):` times one. `announce` prints what starts."""

    def __init__(self, announce: bool = True):
        self.seconds, self.announce, self.started = defaultdict(float), announce, process_start()

    @contextlib.contextmanager
    def __call__(self, name: str, message: Optional[str] = None):
        if message and self.announce:
            print(f"{message} ...", file=sys.stderr, flush=True)
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] += time.perf_counter() - start

    def summary(self) -> dict:
        """{'phases': seconds per phase plus 'other' (start-up, imports, ...), 'process_seconds': the total}."""
        total = time.time() - self.started
        phases = {k: round(v, 2) for k, v in self.seconds.items()}
        phases["other"] = round(max(0.0, total - sum(self.seconds.values())), 2)
        return {"phases": phases, "process_seconds": round(total, 2)}


class Chrono:
    """A fit's clock (big_vision's `chrono`): wall time (a resumed run's included), the training calls' seconds (the
    compiling first call's apart), the last checkpoint's time, and the throughput."""

    def __init__(self, phases: Phases, batch_size: int, elapsed: float = 0.0, start_step: int = 0):
        self.phases, self.batch_size, self.start_step, self.last_step = phases, batch_size, start_step, start_step
        self.t0, self.last_checkpoint = time.perf_counter() - elapsed, time.perf_counter()
        self.compile_steps, self.call_seconds = 0, {True: 0.0, False: 0.0}  # the compiling first call; the others

    def seconds(self) -> float:
        return time.perf_counter() - self.t0

    @contextlib.contextmanager
    def training(self, end: Optional[int] = None):
        """Time the call of steps ending at `end` (yields whether it compiles), or without `end` a wait."""
        compiling, start = end is not None and not self.compile_steps, time.perf_counter()
        with self.phases("compilation", "compiling the training step") if compiling else self.phases("training"):
            yield compiling
            if end is not None:
                self.compile_steps += (end - self.last_step) if compiling else 0
                self.last_step = end
        self.call_seconds[compiling] += time.perf_counter() - start

    def images_per_second(self) -> float:
        """Trained images per second, compilation excluded unless every step ran in the compiling call."""
        steps, seconds = self.last_step - self.start_step - self.compile_steps, self.call_seconds[False]
        if steps <= 0 or seconds <= 0:
            steps, seconds = self.last_step - self.start_step, seconds + self.call_seconds[True]
        return steps * self.batch_size / seconds if steps > 0 and seconds > 0 else 0.0

    def this_process(self) -> dict:
        """This process's figures, which add up: images trained; seconds and images of the compiling call and others."""
        batch, seconds = self.batch_size, self.call_seconds
        return {"images_trained": (self.last_step - self.start_step) * batch,
                "compile_seconds": round(seconds[True], 2), "compile_images": self.compile_steps * batch,
                "training_seconds": round(seconds[False], 2), "images_per_second": round(self.images_per_second(), 1)}
