"""XLA flags cifarjax adds for the CPU backend, before JAX starts it.

* `CPU_FLAGS`, added by a command at its start where it runs on the CPU (`cifarjax.cpu.process`): jaxlib 0.10
  runs CPU convolutions through YNNPACK by default. XLA's own (Eigen) convolutions ran ResNet-18's strided ones
  1.3-3.1x faster (not the stem on 32x32 images at batch 500: 0.95x), which made its 224x224 evaluation
  1.12-1.25x and its train-mode forward pass 1.1x faster (docs/results.md). Matrix products and reductions stay
  with YNNPACK, as by default.
* `MEMORY_SCHEDULE`, added by a command whose run trains all of a ResNet (`schedule_for`): XLA's memory-optimised
  schedule. It made ResNet-18's steps where everything trains 1.05-1.2x faster (32x32 and 224x224) and cut the
  224x224 one's XLA temporaries from 1,133 to 685 MB, but slowed SimpleCNN's step (0.8-0.9x), and the steps where
  only the head or head and layer4 train gained nothing or lost. XLA reads its flags once, when the backend
  starts, so one process has one schedule for all its programs. The order of operations changes, not their
  arithmetic.
"""
from __future__ import annotations

import os
from typing import Mapping, MutableMapping, Optional

CPU_FLAGS = {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE"}
MEMORY_SCHEDULE = {"xla_cpu_scheduler_type": "CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED"}
MEASURED_JAXLIB = ("0.10.",)  # versions whose XLA has these flags (an unknown flag in XLA_FLAGS aborts the process)


def add_cpu_flags(environ: MutableMapping[str, str] = os.environ, jaxlib_version: Optional[str] = None,
                  flags: Mapping[str, str] = CPU_FLAGS) -> list:
    """Append `flags` to `environ['XLA_FLAGS']`, leaving out any flag already there (the user's choice wins), on
    the jaxlib versions they were measured on; returns the flags added. Takes effect only if JAX's backend has not
    started yet."""
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
    """Whether `config` trains all of a ResNet, whose backward pass runs through every layer: where the
    memory-optimised schedule was measured faster."""
    return config.model == "resnet18" and config.unfreeze == "all"


def schedule_for(config, environ: MutableMapping[str, str] = os.environ) -> str:
    """Add `MEMORY_SCHEDULE` where `memory_schedule_pays(config)` and JAX's CPU backend has not started yet (later
    it could not take effect); returns the scheduler XLA_FLAGS now asks for ('default' if none)."""
    if memory_schedule_pays(config) and not _backend_started():
        add_cpu_flags(environ, flags=MEMORY_SCHEDULE)
    return scheduler(environ)


def _backend_started() -> bool:
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
