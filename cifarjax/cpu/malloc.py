"""Giving back the memory XLA's compiler frees (glibc).

Compiling a large program (ResNet-18's training step at 224x224) allocates gigabytes in small pieces; when the
compiler frees them, glibc keeps them in its heap, so the process peaks at that memory plus the program's own
buffers. `malloc_trim` returns the free heap to the system: after compiling that step, 3.5 GB fell to 1.2 GB.
A command turns it on where its run executes on the CPU, whose buffers share the heap (`cifarjax.cpu.process`).
"""
from __future__ import annotations

import ctypes
import ctypes.util
from typing import Optional

import jax

COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"  # reported once each XLA compilation has finished
_libc: Optional[ctypes.CDLL] = None


def _trim(event: str, duration: float, **_) -> None:
    if event == COMPILE_EVENT:
        _libc.malloc_trim(0)


def trim_after_compiling() -> bool:
    """Return freed heap memory to the system after every XLA compilation of this process (glibc only; a no-op
    elsewhere). Returns whether it is on; calling it again changes nothing."""
    global _libc
    if _libc is None:
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            libc.malloc_trim.argtypes = [ctypes.c_size_t]
        except (OSError, AttributeError):  # not glibc: nothing to trim
            return False
        _libc = libc
        jax.monitoring.register_event_duration_secs_listener(_trim)
    return True
