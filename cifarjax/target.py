"""The platform a run's programs are built for (their target; a module named `platform` would shadow Python's
own wherever cifarjax/ is the working directory), decided in one place: `resolve`.

Only the builders ask, and pass the plain JAX program's pieces or the CPU's (`cifarjax.cpu`) in: `build_model`
the layers' formulations (`models.formulations_for`), `make_optimizer` the optimizer, `DataParallel` the step
factory (`step_factory`). So a test on a CPU machine builds the very program a GPU gets with platform="gpu".
"cpu": Winograd/im2col convolutions, fused conv+pool blocks, fusion barriers, optimizer updates computed once,
frozen-only donation (docs/architecture.md). "gpu" (any accelerator): plain JAX, the whole state donated.

`runs_on_cpu`: whether this process *will run* on the CPU, asked before JAX starts a backend (the CPU's XLA flags
and huge pages must be in place before); `deterministic` asks XLA's GPU backend for deterministic kernels.
"""
from __future__ import annotations

import importlib.util
import os
from typing import Mapping, Optional

PLATFORMS = ("cpu", "gpu")
ENV = "CIFARJAX_PLATFORM"  # overrides the platform a run's programs are built for
CONV_IMPLS = ("auto", "winograd", "im2col", "xla")
ACCELERATOR_PLUGINS = ("jax_plugins", "jax_cuda12_plugin", "jax_cuda13_plugin", "libtpu")


def resolve(platform: Optional[str] = None, environ: Mapping[str, str] = os.environ) -> str:
    """`platform` if given, else $CIFARJAX_PLATFORM, else the platform of JAX's default backend ('cpu', or 'gpu'
    for any accelerator). Resolving from the backend starts it."""
    if platform is None:
        platform = environ.get(ENV) or None
    if platform is None:
        import jax
        platform = "cpu" if jax.default_backend() == "cpu" else "gpu"
    if platform not in PLATFORMS:
        raise ValueError(f"platform must be one of {PLATFORMS}, got {platform!r}")
    return platform


def conv_impl(impl: str, platform: str) -> str:
    """The convolution formulation of Config.conv_impl: 'auto' is the platform's choice ('winograd' on the CPU,
    XLA's convolution elsewhere); 'winograd' and 'im2col' (the CPU's, `cifarjax.cpu.conv`) and 'xla' are taken
    as asked, on any platform."""
    if impl not in CONV_IMPLS:
        raise ValueError(f"conv impl must be one of {CONV_IMPLS}, got {impl!r}")
    if impl == "auto":
        return "winograd" if platform == "cpu" else "xla"
    return impl


def step_factory(platform: Optional[str] = None):
    """How the training steps of a run built for `platform` (default: `resolve()`) are pmap-ed,
    `(step, mask, axis_name, devices, **static) -> step`: on the CPU with only the frozen parameters donated
    (`cifarjax.cpu.donation.frozen_apart`), elsewhere with the whole state (`cifarjax.train.donate_state`)."""
    if resolve(platform) == "cpu":
        from cifarjax.cpu.donation import frozen_apart
        return frozen_apart
    from cifarjax.train import donate_state
    return donate_state


def runs_on_cpu(environ: Mapping[str, str] = os.environ) -> bool:
    """Whether this process's JAX will run on the CPU, decided without starting a backend: JAX_PLATFORMS's first
    platform where it is set, else whether no accelerator plugin is installed."""
    platforms = [p.strip() for p in environ.get("JAX_PLATFORMS", "").split(",") if p.strip()]
    if platforms:
        return platforms[0] == "cpu"
    return not any(importlib.util.find_spec(name) is not None for name in ACCELERATOR_PLUGINS)


DETERMINISTIC_FLAG = "--xla_gpu_deterministic_ops=true"


def deterministic(environ=os.environ) -> None:
    """Add XLA's GPU deterministic-ops flag to XLA_FLAGS (`Config.deterministic`): no atomics-based kernels, and
    autotuning only among deterministic ones, so a program repeats its results bit for bit on a GPU (a CPU's
    already do). XLA reads its flags when the backend starts: call this before anything starts it."""
    current = environ.get("XLA_FLAGS", "")
    if "--xla_gpu_deterministic_ops=" not in current:
        environ["XLA_FLAGS"] = f"{current} {DETERMINISTIC_FLAG}".strip()
