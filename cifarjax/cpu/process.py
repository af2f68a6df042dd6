"""A command's process-wide settings for the CPU, applied when it starts (never when a module is imported) and
only where its run executes on the CPU (`cifarjax.target.runs_on_cpu`: JAX_PLATFORMS=cpu, or no accelerator
plugin installed), before JAX starts its backend:

* huge pages for its buffers: the command relaunches itself with glibc's tunable (`cifarjax.cpu.hugepages`);
* the CPU's XLA flags (`cifarjax.cpu.xla_flags.CPU_FLAGS`; the memory-optimised schedule comes later, from the
  run's configuration: `cifarjax.cpu.xla_flags.schedule_for`);
* freed compiler memory handed back after each compilation (`cifarjax.cpu.malloc`).

`applied()` says what is in effect, for summary.json.
"""
from __future__ import annotations

import os
from typing import MutableMapping, Optional

from cifarjax.cpu import hugepages, xla_flags
from cifarjax.errors import warn
from cifarjax.target import runs_on_cpu

_trimming = False


def tune(package: Optional[str] = "experiments", environ: MutableMapping[str, str] = os.environ,
         relaunch: bool = True) -> bool:
    """Apply the CPU's process-wide settings where this process will run on the CPU (started as
    `python -m <package>.NAME`, or with `package` None as any script, it may exec itself again first, with huge
    pages, unless not `relaunch`); returns whether it did."""
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
    """The commands' CPU settings for a research script (`cj.tune_process()`): call it first, before anything
    starts JAX's backend. Where the script runs on the CPU: the CPU's XLA flags, compiler memory handed back, and
    (`relaunch`) huge pages, by running the script again from its start with glibc's tunable (a script or module
    run from the shell; never an interactive session). Returns what is in effect (`applied()`), None off the CPU.
    Called after JAX's backend started, it changes nothing and says so in one warning line."""
    import jax._src.xla_bridge as xla_bridge
    if xla_bridge.backends_are_initialized():
        warn("tune_process() changed nothing: JAX's backend had already started (a jax.numpy array, jax.devices(), "
             "a cifarjax loop); call it first in the script")
    elif not tune(None, os.environ, relaunch):
        return None
    return applied()


def applied(environ: MutableMapping[str, str] = os.environ) -> Optional[dict]:
    """The CPU settings in effect in this process (None where it does not run on the CPU): cifarjax's XLA flags
    in XLA_FLAGS (whoever put them there), the scheduler, huge pages and malloc trimming."""
    if not runs_on_cpu(environ):
        return None
    names = [f"--{name}=" for name in {**xla_flags.CPU_FLAGS, **xla_flags.MEMORY_SCHEDULE}]
    flags = [f for f in environ.get("XLA_FLAGS", "").split() if f.startswith(tuple(names))]
    return {"xla_flags": flags, "xla_cpu_scheduler": xla_flags.scheduler(environ),
            "huge_pages": hugepages.in_effect(environ), "malloc_trim": _trimming}
