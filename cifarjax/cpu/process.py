"""A command's CPU settings (`tune`), where its run executes on the CPU, before JAX starts its backend: XLA flags,
transparent huge pages (glibc 2.35+: 40-125x fewer page faults on XLA's buffers; `GLIBC_TUNABLES=glibc.malloc.hugetlb=0`
opts out) and malloc trimming; `applied()` says what is in effect, for summary.json."""
from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import importlib.util
import os
import platform
import re
import sys
from pathlib import Path
from typing import Mapping, MutableMapping, Optional

from cifarjax.errors import warn
from cifarjax.target import runs_on_cpu

# XLA's own convolutions instead of YNNPACK's; where all of a ResNet trains, the memory-optimised schedule (the
# order of operations changes, not their arithmetic)
CPU_FLAGS = {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE"}
MEMORY_SCHEDULE = {"xla_cpu_scheduler_type": "CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED"}
MEASURED_JAXLIB = ("0.10.",)  # versions whose XLA has these flags (an unknown flag in XLA_FLAGS aborts the process)
TUNABLE = "glibc.malloc.hugetlb"  # glibc's huge-page tunable, read only at a process's start (so: a relaunch)
THP_SETTING = Path("/sys/kernel/mm/transparent_hugepage/enabled")
FIRST_GLIBC = (2, 35)  # the first glibc with the tunable
COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"  # reported once each XLA compilation has finished
_libc: Optional[ctypes.CDLL] = None


def add_cpu_flags(environ: MutableMapping[str, str] = os.environ, jaxlib_version: Optional[str] = None,
                  flags: Mapping[str, str] = CPU_FLAGS) -> list:
    """Append `flags` not already in `environ['XLA_FLAGS']` (the user's choice wins), on the jaxlib versions they
    were measured on; returns the flags added."""
    if jaxlib_version is None:
        from jaxlib import __version__ as jaxlib_version
    if not jaxlib_version.startswith(MEASURED_JAXLIB):
        return []
    current = environ.get("XLA_FLAGS", "")
    added = [f"--{name}={value}" for name, value in flags.items() if f"--{name}=" not in current]
    if added:
        environ["XLA_FLAGS"] = " ".join([current, *added]).strip()
    return added


def memory_schedule_pays(config) -> bool:
    """Whether `config` trains all of a ResNet, where the memory-optimised schedule was measured faster."""
    return config.model == "resnet18" and config.unfreeze == "all"


def schedule_for(config, environ: MutableMapping[str, str] = os.environ) -> str:
    """Add `MEMORY_SCHEDULE` where it pays and JAX's backend has not started; returns the scheduler asked for."""
    if memory_schedule_pays(config) and not backend_started():
        add_cpu_flags(environ, flags=MEMORY_SCHEDULE)
    return scheduler(environ)


def backend_started() -> bool:
    """Whether JAX's backend has started (and read XLA_FLAGS)."""
    try:
        from jax._src.xla_bridge import backends_are_initialized
    except ImportError:  # moved in a later JAX: change nothing that might not take effect
        return True
    return backends_are_initialized()


def scheduler(environ: Mapping[str, str] = os.environ) -> str:
    """The CPU scheduler XLA_FLAGS asks for (the last setting wins, as in XLA), or 'default'."""
    name = next(iter(MEMORY_SCHEDULE))
    values = [flag.split("=", 1)[1] for flag in environ.get("XLA_FLAGS", "").split() if flag.startswith(f"--{name}=")]
    return values[-1] if values else "default"


def kernel_mode(setting: Path = THP_SETTING) -> Optional[str]:
    """The kernel's transparent-huge-page mode ("always", "madvise" or "never"), None where there is none."""
    with contextlib.suppress(OSError):
        mode = re.search(r"\[(\w+)\]", setting.read_text())
        return mode and mode.group(1)


def relaunch_environ(environ: Mapping[str, str], mode: Optional[str], libc: Optional[str] = None) -> Optional[dict]:
    """`environ` plus the tunable, or None where relaunching changes nothing (the kernel's mode is not "madvise",
    no glibc with the tunable, or GLIBC_TUNABLES already sets it)."""
    current = environ.get("GLIBC_TUNABLES", "")
    name, _, version = (libc or " ".join(platform.libc_ver())).partition(" ")  # "glibc 2.36"
    if mode != "madvise" or f"{TUNABLE}=" in current or name != "glibc" or \
            tuple(int(p) for p in re.findall(r"\d+", version)[:2]) < FIRST_GLIBC:
        return None
    return {**environ, "GLIBC_TUNABLES": ":".join(filter(None, [current, f"{TUNABLE}=1"]))}


def in_effect(environ: Mapping[str, str] = os.environ, mode: Optional[str] = None) -> bool:
    """Whether a process started with `environ` gets huge pages for its large buffers."""
    mode = kernel_mode() if mode is None else mode
    return mode == "always" or (mode == "madvise" and f"{TUNABLE}=1" in environ.get("GLIBC_TUNABLES", "").split(":"))


def _runs_the_main_script(argv: list) -> bool:
    """Whether executing `argv` again runs the script that is `__main__` now, not something that runs it in turn
    (pytest, runpy, a notebook's kernel)."""
    main = getattr(sys.modules.get("__main__"), "__file__", None)
    if main is None or len(argv) < 2:
        return False
    first = next((i for i, a in enumerate(argv[1:], 1) if not a.startswith("-") or a == "-m"), None)
    if first is None or argv[first] == "-m" and first + 1 >= len(argv):
        return False
    started = getattr(importlib.util.find_spec(argv[first + 1]), "origin", None) if argv[first] == "-m" else argv[first]
    return started is not None and os.path.realpath(started) == os.path.realpath(main)


def relaunch_command(package: Optional[str]) -> None:
    """Exec this process again with huge pages where it was started as `python -m <package>.NAME` (`package` None:
    any script or module) and that changes something; otherwise (or if the exec fails) return."""
    argv = sys.orig_argv
    launched = _runs_the_main_script(argv) if package is None else \
        any(a == "-m" and b.startswith(f"{package}.") for a, b in zip(argv, argv[1:]))
    environ = relaunch_environ(os.environ, kernel_mode()) if launched else None
    if environ is not None:
        with contextlib.suppress(OSError):  # run as started
            os.execve(sys.executable, argv, environ)


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
        jax.monitoring.register_event_duration_secs_listener(
            lambda event, duration, **_: event == COMPILE_EVENT and libc.malloc_trim(0))
    return True


def tune(package: Optional[str] = "experiments", environ: MutableMapping[str, str] = os.environ,
         relaunch: bool = True) -> bool:
    """Apply the CPU's settings where this process will run on the CPU (first, unless not `relaunch`, re-executing
    itself with huge pages if started as `python -m <package>.NAME`, or any script); returns whether it did."""
    if not runs_on_cpu(environ):
        return False
    if relaunch:
        relaunch_command(package)
    add_cpu_flags(environ)
    trim_after_compiling()
    return True


def tune_process(relaunch: bool = True) -> Optional[dict]:
    """The commands' CPU settings for a research script (`cj.tune_process()`), called before anything starts JAX's
    backend (later it warns and changes nothing); returns `applied()`, None off the CPU."""
    if backend_started():
        warn("tune_process() changed nothing: JAX's backend had already started (a jax.numpy array, jax.devices(), "
             "a cifarjax loop); call it first in the script")
    elif not tune(None, os.environ, relaunch):
        return None
    return applied()


def applied(environ: MutableMapping[str, str] = os.environ) -> Optional[dict]:
    """The CPU settings in effect (None off the CPU): cifarjax's XLA flags, the scheduler, huge pages, trimming."""
    if not runs_on_cpu(environ):
        return None
    names = [f"--{name}=" for name in {**CPU_FLAGS, **MEMORY_SCHEDULE}]
    flags = [f for f in environ.get("XLA_FLAGS", "").split() if f.startswith(tuple(names))]
    return {"xla_flags": flags, "xla_cpu_scheduler": scheduler(environ), "huge_pages": in_effect(environ),
            "malloc_trim": _libc is not None}
