"""XLA flags cifarjax adds for the CPU backend, before JAX starts it (importing cifarjax does this).

jaxlib 0.10 runs CPU convolutions through YNNPACK by default. XLA's own (Eigen) convolutions ran ResNet-18's
strided ones 1.3-3.1x faster (not the stem on 32x32 images at batch 500: 0.95x), which made its 224x224 evaluation
1.12-1.25x and its train-mode forward pass 1.1x faster (docs/results.md). Matrix products and reductions stay with
YNNPACK, as by default.
"""
from __future__ import annotations

import os
from typing import MutableMapping, Optional

CPU_FLAGS = {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE"}
MEASURED_JAXLIB = ("0.10.",)  # versions whose XLA has these flags (an unknown flag in XLA_FLAGS aborts the process)


def add_cpu_flags(environ: MutableMapping[str, str] = os.environ, jaxlib_version: Optional[str] = None) -> list:
    """Append `CPU_FLAGS` to `environ['XLA_FLAGS']`, leaving out any flag already there (the user's choice wins), on
    the jaxlib versions they were measured on; returns the flags added. Takes effect only if JAX's backend has not
    started yet."""
    if jaxlib_version is None:
        import jaxlib
        jaxlib_version = jaxlib.__version__
    if not jaxlib_version.startswith(MEASURED_JAXLIB):
        return []
    current = environ.get("XLA_FLAGS", "")
    added = [f"--{name}={value}" for name, value in CPU_FLAGS.items() if f"--{name}=" not in current]
    if added:
        environ["XLA_FLAGS"] = " ".join([current, *added]).strip()
    return added
