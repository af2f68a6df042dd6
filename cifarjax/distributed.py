"""Several processes or hosts with JAX's distributed runtime (`initialize`, before any JAX backend starts; without it
every helper is a no-op): process 0 alone writes, `agree` refuses mismatched settings, a dead peer ends the others."""
from __future__ import annotations

import functools
import hashlib
import json
from typing import Optional

import jax
import numpy as np
from jax.experimental import multihost_utils

from cifarjax.errors import UserError, request_hard_exit, translators


def initialize(coordinator: str = None, num_processes: int = None, process_id: int = None, auto: bool = False) -> None:
    """Start JAX's distributed runtime: from explicit settings, or (`auto`) detected from the cluster."""
    explicit = (coordinator, num_processes, process_id)
    if jax.distributed.is_initialized() or (not auto and all(v is None for v in explicit)):
        return
    if not auto and any(v is None for v in explicit):
        raise UserError("--coordinator, --num-processes and --process-id go together; pass all three, or "
                        "--distributed to detect them from the cluster's environment")
    if not auto and not 0 <= process_id < num_processes:
        raise UserError(f"--process-id must be in [0, {num_processes}), got {process_id}")
    try:  # a dead peer is noticed within the heartbeat timeout plus the shutdown timeout
        jax.distributed.initialize(coordinator, num_processes, process_id, heartbeat_timeout_seconds=30,
                                   shutdown_timeout_seconds=30)
    except (RuntimeError, ValueError) as error:
        raise UserError(f"could not start JAX's distributed runtime ({str(error).splitlines()[0][:300]}); "
                        "check --coordinator HOST:PORT is reachable from every process, or the cluster's "
                        "environment for --distributed") from None
    translators.append(functools.partial(peer_lost, resume_hint="the same command and --resume"))


def is_writer() -> bool:
    """Process 0 writes the run's files and shows progress."""
    return jax.process_index() == 0


def agree(values: dict, what: str) -> None:
    """Refuse to go on unless every process has the same `values` (compared by digest, key by key)."""
    if jax.process_count() == 1:
        return
    keys = sorted(values)
    digests = [hashlib.sha256(json.dumps(values[k], sort_keys=True, default=str).encode()).digest() for k in keys]
    mine = np.stack([np.frombuffer(d, np.uint8).astype(np.int32) for d in digests])
    everyone = np.asarray(multihost_utils.process_allgather(mine))  # (processes, keys, 32)
    differing = [k for i, k in enumerate(keys) if not (everyone[:, i] == everyone[0, i]).all()]
    if differing:
        raise UserError(f"the processes of this run disagree on {what}: {', '.join(differing)} differ (this "
                        f"process, {jax.process_index()}, has {', '.join(f'{k}={values[k]!r}' for k in differing)}); "
                        "start every process with the same flags and data")


def writer_decides(flag: bool) -> bool:
    """Process 0's `flag` in every process: a choice all must make alike from something local (a clock)."""
    return flag if jax.process_count() == 1 else bool(multihost_utils.broadcast_one_to_all(np.asarray(flag)))


def barrier(name: str) -> None:
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


PEER_FAILURES = ("Gloo", "gloo", "Connection reset", "UNAVAILABLE", "heartbeat", "DEADLINE_EXCEEDED",
                 "Connection closed", "Socket closed")  # what a collective's error says when another process is gone


def peer_lost(error: BaseException, resume_hint: str) -> Optional[UserError]:
    """The one-line error for a dead peer (the process then leaves without the runtime's shutdown), else None."""
    if jax.process_count() == 1 or not any(s in str(error) for s in PEER_FAILURES):
        return None
    request_hard_exit()
    first = str(error).strip().splitlines()[0][:160] if str(error).strip() else type(error).__name__
    return UserError(f"another process of this distributed run stopped ({first}); this process {jax.process_index()} "
                     f"stops too. Restart every process with {resume_hint}")
