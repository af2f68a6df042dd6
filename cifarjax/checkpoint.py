"""Orbax checkpoints of a run: variables, optimizer state and step, and JSON metadata (config, metrics).

Writes are atomic (orbax commits a finished checkpoint by renaming it), only the last k are kept, and
saving runs in a background thread: `close()` waits for it.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

import jax
import numpy as np
import orbax.checkpoint as ocp

from cifarjax.errors import UserError

CHECKPOINTS = "checkpoints"
logging.getLogger("absl").setLevel(logging.WARNING)


class Checkpointer:
    """Save and restore a `TrainState` (unreplicated) plus a JSON-able `meta` dict under run_dir/checkpoints."""

    def __init__(self, run_dir: Path, keep: int = 3):
        self.directory = Path(run_dir).resolve() / CHECKPOINTS
        self.manager = ocp.CheckpointManager(self.directory, options=ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True, enable_async_checkpointing=True))

    def latest_step(self) -> Optional[int]:
        return self.manager.latest_step()

    def save(self, state, meta: dict) -> None:
        """Queue a checkpoint of `state` (host copies are taken before returning) and `meta`."""
        state = jax.device_get(state)
        variables = {"params": state.params, "batch_stats": state.batch_stats}
        train = {"opt_state": state.opt_state, "step": np.asarray(state.step), "key": np.asarray(state.key)}
        self.manager.save(int(state.step), args=ocp.args.Composite(
            variables=ocp.args.StandardSave(variables), train=ocp.args.StandardSave(train),
            meta=ocp.args.JsonSave(meta)))

    def restore(self, state, step: Optional[int] = None):
        """(state, meta) of checkpoint `step` (default: latest), restored onto the structure of `state`."""
        step = self.latest_step() if step is None else step
        target = jax.eval_shape(lambda: {"variables": {"params": state.params, "batch_stats": state.batch_stats},
                                         "train": {"opt_state": state.opt_state, "step": state.step,
                                                   "key": state.key}})
        r = self.manager.restore(step, args=ocp.args.Composite(
            variables=ocp.args.StandardRestore(target["variables"]), train=ocp.args.StandardRestore(target["train"]),
            meta=ocp.args.JsonRestore()))
        state = state.replace(params=r.variables["params"], batch_stats=r.variables["batch_stats"],
                              opt_state=r.train["opt_state"], step=r.train["step"], key=r.train["key"])
        return state, r.meta

    def close(self) -> None:
        """Wait for pending saves and release the manager."""
        self.manager.wait_until_finished()
        self.manager.close()


def find_run(run_dir) -> Path:
    """The folder holding `checkpoints/`: run_dir itself, or its single sub-run."""
    run_dir = Path(run_dir)
    if (run_dir / CHECKPOINTS).is_dir():
        return run_dir
    if not run_dir.is_dir():
        raise UserError(f"run folder {run_dir} does not exist; pass the --out folder of a finished run")
    subruns = sorted(p for p in run_dir.iterdir() if (p / CHECKPOINTS).is_dir())
    if len(subruns) == 1:
        return subruns[0]
    if subruns:
        raise UserError(f"{run_dir} holds {len(subruns)} runs ({', '.join(p.name for p in subruns)}); "
                        f"pass one of them, for example {subruns[-1]}")
    raise UserError(f"{run_dir} holds no checkpoints; pass the --out folder of a run that finished an epoch")


def load_variables(run_dir) -> dict:
    """The latest checkpoint's {'params': ..., 'batch_stats': ...} (host numpy arrays) of the run in run_dir."""
    directory = find_run(run_dir).resolve() / CHECKPOINTS
    manager = ocp.CheckpointManager(directory)
    try:
        step = manager.latest_step()
        if step is None:
            raise UserError(f"{directory} holds no finished checkpoint; train at least one epoch first")
        restored = manager.restore(step, args=ocp.args.Composite(variables=ocp.args.StandardRestore()))
        return {"params": restored.variables["params"], "batch_stats": restored.variables.get("batch_stats", {})}
    finally:
        manager.close()
