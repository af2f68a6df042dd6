"""A command's process-wide settings for the CPU (huge pages, XLA flags, malloc trimming), applied at its start
where its run executes on the CPU (`cifarjax.target.runs_on_cpu`), before JAX starts its backend; `applied()`
says what is in effect, for summary.json."""
from __future__ import annotations

import os
from typing import MutableMapping, Optional

from cifarjax.cpu import hugepages, xla_flags
from cifarjax.errors import warn
from cifarjax.target import runs_on_cpu

_trimming = False


def tune(package: Optional[str] = "experiments", environ: MutableMapping[str, str] = os.environ,
         relaunch: bool = True) -> bool:
    """Apply the CPU's settings where this process will run on the CPU (first, unless not `relaunch`, re-executing
    itself with huge pages if started as `python -m <package>.NAME`, or any script); returns whether it did."""
    global _trimming
    if not runs_on_cpu(environ):
        return False
    if relaunch:
        hugepages.relaunch_command(package)
    xla_flags.add_cpu_flags(environ)
    from cifarjax.cpu.malloc import trim_after_compiling
    _trimming = trim_after_compiling()
    return True


def tune_process(relaunch: bool = True) -> Optional[dict]:
    """The commands' CPU settings for a research script (`cj.tune_process()`), called before anything starts JAX's
    backend (later it warns and changes nothing); returns `applied()`, None off the CPU."""
    import jax._src.xla_bridge as xla_bridge
    if xla_bridge.backends_are_initialized():
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
            "huge_pages": hugepages.in_effect(environ), "malloc_trim": _trimming}
