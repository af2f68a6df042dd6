"""XLA flags cifarjax adds for the CPU backend before JAX starts it (XLA reads them once): `CPU_FLAGS`, XLA's own
convolutions instead of YNNPACK's, and `MEMORY_SCHEDULE` where all of a ResNet trains (the order of operations
changes, not their arithmetic)."""
from __future__ import annotations

import os
from typing import Mapping, MutableMapping, Optional

CPU_FLAGS = {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE"}
MEMORY_SCHEDULE = {"xla_cpu_scheduler_type": "CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED"}
MEASURED_JAXLIB = ("0.10.",)  # versions whose XLA has these flags (an unknown flag in XLA_FLAGS aborts the process)


def add_cpu_flags(environ: MutableMapping[str, str] = os.environ, jaxlib_version: Optional[str] = None,
                  flags: Mapping[str, str] = CPU_FLAGS) -> list:
    """Append `flags` not already in `environ['XLA_FLAGS']` (the user's choice wins), on the jaxlib versions they
    were measured on; returns the flags added."""
    if jaxlib_version is None:
        import jaxlib
        jaxlib_version = jaxlib.__version__
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
