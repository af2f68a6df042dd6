"""This process's peak memory. (Giving back the memory XLA's compiler frees: `cifarjax.cpu.process`.)"""
from __future__ import annotations

import resource
import sys


def peak_memory_mb() -> float:
    """This process's peak resident memory in MB (Linux VmHWM: not inflated by a parent that forked it)."""
    try:
        with open("/proc/self/status") as f:
            return round(int(next(line for line in f if line.startswith("VmHWM:")).split()[1]) / 1024, 1)
    except (OSError, StopIteration):
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return round(peak / (1024 * 1024 if sys.platform == "darwin" else 1024), 1)
