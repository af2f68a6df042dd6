"""A command's process-wide settings for the CPU (huge pages, XLA flags, malloc trimming), applied at its start
where its run executes on the CPU (`cifarjax.target.runs_on_cpu`), before JAX starts its backend; `applied()`
says what is in effect, for summary.json."""
from __future__ import annotations

import ctypes
import ctypes.util
import os
from typing import MutableMapping, Optional

from cifarjax.cpu import hugepages, xla_flags
from cifarjax.errors import warn
from cifarjax.target import runs_on_cpu

COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"  # reported once each XLA compilation has finished
_libc: Optional[ctypes.CDLL] = None


def _trim(event: str, duration: float, **_) -> None:
    if event == COMPILE_EVENT:
        _libc.malloc_trim(0)


def trim_after_compiling() -> bool:
    """Return the heap XLA's compiler frees to the system after every compilation (glibc keeps it: ResNet-18's
    224x224 step peaked at 3.5 GB instead of 1.2); glibc only. Returns whether it is on."""
    global _libc
    if _libc is None:
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            libc.malloc_trim.argtypes = [ctypes.c_size_t]
        except (OSError, AttributeError):  # not glibc: nothing to trim
            return False
        import jax
        _libc = libc
        jax.monitoring.register_event_duration_secs_listener(_trim)
    return True


def tune(package: Optional[str] = "experiments", environ: MutableMapping[str, str] = os.environ,
         relaunch: bool = True) -> bool:
    """Apply the CPU's settings where this process will run on the CPU (first, unless not `relaunch`, re-executing
    itself with huge pages if started as `python -m <package>.NAME`, or any script); returns whether it did."""
    if not runs_on_cpu(environ):
        return False
    if relaunch:
        hugepages.relaunch_command(package)
    xla_flags.add_cpu_flags(environ)
    trim_after_compiling()
    return True


def tune_process(relaunch: bool = True) -> Optional[dict]:
    """The commands' CPU settings for a research script (`cj.tune_process()`), called before anything starts JAX's
    backend (later it warns and changes nothing); returns `applied()`, None off the CPU."""
    if xla_flags.backend_started():
        warn("tune_process() changed nothing: JAX's backend had already started (a jax.numpy array, jax.devices(), "
             "a cifarjax loop); call it first in the script")
    elif not tune(None, os.environ, relaunch):
        return None
    return applied()


def applied(environ: MutableMapping[str, str] = os.environ) -> Optional[dict]:
    """The CPU settings in effect (None off the CPU): cifarjax's XLA flags, the scheduler, huge pages, trimming."""
    if not runs_on_cpu(environ):
        return None
    names = [f"--{name}=" for name in {**xla_flags.CPU_FLAGS, **xla_flags.MEMORY_SCHEDULE}]
    flags = [f for f in environ.get("XLA_FLAGS", "").split() if f.startswith(tuple(names))]
    return {"xla_flags": flags, "xla_cpu_scheduler": xla_flags.scheduler(environ),
            "huge_pages": hugepages.in_effect(environ), "malloc_trim": _libc is not None}
