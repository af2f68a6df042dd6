"""The platform a run's programs are built for, decided in one place (`resolve`) and asked only by the builders,
which pass the plain program's pieces or the CPU's (`cifarjax.cpu`) in. (`platform` would shadow Python's own.)"""
from __future__ import annotations

import importlib.util
import os
from typing import Mapping, Optional

PLATFORMS = ("cpu", "gpu")
ENV = "CIFARJAX_PLATFORM"  # overrides the platform a run's programs are built for
CONV_IMPLS = ("auto", "winograd", "im2col", "xla")
ACCELERATOR_PLUGINS = ("jax_plugins", "jax_cuda12_plugin", "jax_cuda13_plugin", "libtpu")


def resolve(platform: Optional[str] = None, environ: Mapping[str, str] = os.environ) -> str:
    """`platform` if given, else $CIFARJAX_PLATFORM, else JAX's default backend's ('cpu', or 'gpu' for any
    accelerator), which this starts: the one source of the platform of a run."""
    platform = platform or environ.get(ENV)
    if not platform:
        import jax
        platform = "cpu" if jax.default_backend() == "cpu" else "gpu"
    if platform not in PLATFORMS:
        raise ValueError(f"platform must be one of {PLATFORMS}, got {platform!r}")
    return platform


def conv_impl(impl: str, platform: str) -> str:
    """Config.conv_impl's formulation: 'auto' is the platform's ('winograd' on the CPU, else 'xla'), others as asked."""
    if impl not in CONV_IMPLS:
        raise ValueError(f"conv impl must be one of {CONV_IMPLS}, got {impl!r}")
    return impl if impl != "auto" else "winograd" if platform == "cpu" else "xla"


def step_factory(platform: Optional[str] = None):
    """How a run's steps are pmap-ed, `(step, mask, axis_name, devices, **static) -> step` (the CPU's: frozen_apart)."""
    if resolve(platform) == "cpu":
        from cifarjax.cpu.donation import frozen_apart
        return frozen_apart
    from cifarjax.train import donate_state
    return donate_state


def runs_on_cpu(environ: Mapping[str, str] = os.environ) -> bool:
    """Whether this process's JAX will run on the CPU, without starting a backend (the CPU's XLA flags must come
    first): JAX_PLATFORMS's first platform, else whether no accelerator plugin is installed."""
    platforms = [p.strip() for p in environ.get("JAX_PLATFORMS", "").split(",") if p.strip()]
    if platforms:
        return platforms[0] == "cpu"
    return not any(importlib.util.find_spec(name) is not None for name in ACCELERATOR_PLUGINS)


def deterministic(environ=os.environ) -> None:
    """Add XLA's GPU deterministic-ops flag to XLA_FLAGS (`Config.deterministic`) unless set, before the backend
    starts, so a program repeats its results bit for bit on a GPU (a CPU's already do)."""
    current = environ.get("XLA_FLAGS", "")
    if "--xla_gpu_deterministic_ops=" not in current:
        environ["XLA_FLAGS"] = f"{current} --xla_gpu_deterministic_ops=true".strip()
