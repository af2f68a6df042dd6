"""Giving back the memory XLA's compiler frees (glibc keeps it in its heap: after compiling ResNet-18's 224x224
step, `malloc_trim` took the process from 3.5 GB to 1.2 GB)."""
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
    """Return freed heap memory to the system after every XLA compilation (glibc only); returns whether it is on."""
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
