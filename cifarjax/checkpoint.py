"""A run's orbax checkpoints (what trains, optimizer state, metadata with the arrays' SHA-256: a damaged one is
reported and the newest intact one used) and its frozen parameters, written once to frozen_params.npz."""
from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import json
import logging
import os
import re
import shutil
import threading
from pathlib import Path
from typing import Optional

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import traverse_util

from cifarjax.errors import UserError, request_hard_exit, user_error_from_os, warn
from cifarjax.freezing import join_frozen, split_frozen
from cifarjax.runs import CHECKPOINTS, CONFIG, FROZEN, TENSORBOARD, RunFolder, atomic_write


def _drop_orbax_failures(record: logging.LogRecord) -> bool:
    """Drop orbax's ERROR records, and asyncio's about orbax's unread task exceptions: a failed save is logged by
    each of its threads, then raised where cifarjax reports it in one line."""
    if record.levelno < logging.ERROR:
        return True
    if record.name == "asyncio":
        return not ("never retrieved" in record.getMessage() and f"{os.sep}orbax{os.sep}" in record.getMessage())
    return f"{os.sep}orbax{os.sep}" not in record.pathname


class _QuietClosedLoopPolicy(asyncio.DefaultEventLoopPolicy):
    class _loop_factory(asyncio.SelectorEventLoop):  # noqa: N801 - the attribute the policy calls
        """An event loop that drops callbacks arriving after it closed: after a restore fails on a damaged array,
        tensorstore's reads still in flight would each print an "Event loop is closed" traceback."""

        def call_soon_threadsafe(self, callback, *args, context=None):
            try:
                return super().call_soon_threadsafe(callback, *args, context=context)
            except RuntimeError:
                if self.is_closed():
                    return None
                raise


def quiet_orbax() -> None:
    """Keep orbax's background noise out of a command's output (process-wide: the commands call it at their start,
    importing cifarjax never does). Idempotent."""
    logging.getLogger("absl").setLevel(logging.ERROR)
    for logger in map(logging.getLogger, ("absl", "asyncio")):
        logger.addFilter(_drop_orbax_failures)  # once: addFilter skips a filter the logger has
    if type(asyncio.get_event_loop_policy()) is asyncio.DefaultEventLoopPolicy:  # leave a chosen policy (uvloop) alone
        asyncio.set_event_loop_policy(_QuietClosedLoopPolicy())


def digest(tree) -> str:
    """SHA-256 of a pytree's leaves (paths, dtypes, shapes and bytes), in a fixed order."""
    h = hashlib.sha256()
    for path, leaf in sorted(jax.tree_util.tree_leaves_with_path(tree), key=lambda item: jax.tree_util.keystr(item[0])):
        leaf = np.ascontiguousarray(leaf)
        h.update(f"{jax.tree_util.keystr(path)}|{leaf.dtype}|{leaf.shape}".encode())
        h.update(leaf.tobytes())
    return h.hexdigest()


class Checkpointer:
    """Save and restore a `TrainState` (unreplicated) and a JSON-able `meta` under run_dir/checkpoints, in the
    background (`close()` waits). `trainable`: the freezing policy's mask over the parameters (None: all train)."""

    def __init__(self, run_dir: Path, keep: int = 3, trainable=None):
        self.run_dir = Path(run_dir).resolve()
        self.directory = self.run_dir / CHECKPOINTS
        self.trainable, self.failed = trainable, False
        try:
            self.manager = ocp.CheckpointManager(self.directory, options=ocp.CheckpointManagerOptions(
                max_to_keep=keep, create=True, enable_async_checkpointing=True))
        except OSError as error:
            raise user_error_from_os(error, f"cannot create checkpoints in {self.directory}") from None

    def _stored(self, state) -> dict:
        """The arrays a checkpoint holds: what trains, statistics, their moving average, optimizer state."""
        params = state.params if self.trainable is None else split_frozen(state.params, self.trainable)[0]
        variables = {"params": params, "batch_stats": state.batch_stats}
        if state.ema_params is not None:
            variables.update(ema_params=state.ema_params, ema_batch_stats=state.ema_batch_stats)
        return {"variables": variables,
                "train": {"opt_state": state.opt_state, "step": np.asarray(state.step), "key": np.asarray(state.key)}}

    def write_frozen(self, params, is_writer: bool = True) -> None:
        """Write the frozen parameters once, unless the file the run's config.json names exists."""
        if self.trainable is not None and is_writer:
            path, recorded = _frozen_file(self.run_dir)
            if recorded is None or not path.is_file():
                write_frozen_file(split_frozen(params, self.trainable)[1], path)

    def save(self, state, meta: dict) -> None:
        """Queue a checkpoint of `state` (host copies are taken before returning) and `meta` (+ digests)."""
        stored = jax.device_get(self._stored(state))
        meta = dict(meta, digest={k: digest(v) for k, v in stored.items()})
        RunFolder.record(self.directory / str(int(state.step)))
        with self._write_errors():
            self.manager.save(int(state.step), args=ocp.args.Composite(
                meta=ocp.args.JsonSave(meta), **{k: ocp.args.StandardSave(v) for k, v in stored.items()}))

    @contextlib.contextmanager
    def _write_errors(self):
        """A failed write (here, or an earlier save in the background) becomes one line saying why and how to go on;
        the unfinished checkpoint is removed. Where orbax's threads of it are left waiting, the command ends at once."""
        try:
            yield
        except Exception as error:  # noqa: BLE001 - orbax and tensorstore wrap OS errors in many types
            self.failed = True
            if any(t.is_alive() and not t.daemon and type(t).__module__.startswith("orbax")
                   for t in threading.enumerate()):
                request_hard_exit()
            for unfinished in self.directory.glob("*.orbax-checkpoint-tmp*"):
                shutil.rmtree(unfinished, ignore_errors=True)
            why, fix = _why_not_written(error)
            finished = self.directory.is_dir() and any(p.name.isdigit() for p in self.directory.iterdir())
            too_long = (why, fix) == _WRITE_FIXES[errno.ENAMETOOLONG]
            if finished:
                then = f"the finished checkpoints are kept: {fix}, then resume the run with --resume" + \
                    " --out NEW_PATH" * too_long
            else:
                then = "no checkpoint was finished: " + ("start the run again with a shorter --out" if too_long else
                                                         f"{fix}, then start the run again with --overwrite")
            raise UserError(f"cannot write a checkpoint in {self.directory}: {why}; {then}") from None

    def restore(self, state):
        """(state, meta) of the newest intact checkpoint; damaged newer ones are reported and removed."""
        restored = restore_newest_intact(self.manager, jax.eval_shape(lambda: self._stored(state)), remove_damaged=True)
        v, t = restored.variables, restored.train
        params = v["params"] if self.trainable is None else join_frozen(  # frozen: the run's file's, not the caller's
            v["params"], frozen_params(self.run_dir) or split_frozen(state.params, self.trainable)[1])
        state = state.replace(params=params, batch_stats=v["batch_stats"], opt_state=t["opt_state"], step=t["step"],
                              key=t["key"], ema_params=v.get("ema_params"), ema_batch_stats=v.get("ema_batch_stats"))
        return state, restored.meta

    def close(self) -> None:
        """Wait for pending saves and release the manager (not after a failed write: its threads may never end)."""
        if self.failed:
            return
        try:
            with self._write_errors():
                self.manager.wait_until_finished()
        finally:
            if not self.failed:
                with self._write_errors():
                    self.manager.close()


_WRITE_FIXES = {errno.ENOSPC: ("the disk is full", "free space there"),
                errno.EDQUOT: ("the disk quota is used up", "free space there"),
                errno.ENAMETOOLONG: ("the path is too long", "move the run folder to a shorter path"),
                errno.EACCES: ("permission denied", "make the folder writable"),
                errno.EPERM: ("operation not permitted", "make the folder writable"),
                errno.EROFS: ("the file system is read-only", "make the folder writable")}


def _why_not_written(error: Exception) -> tuple:
    """(what went wrong, what to do) for a failed write: an OSError, or orbax's and tensorstore's errors, which
    carry it in their text ("[os_error_code='36']", "[OS error: 28]", RESOURCE_EXHAUSTED)."""
    text, found = str(error), re.search(r"(?:os_error_code='|OS error: |\[Errno )(\d+)", str(error))
    code = (error.errno if isinstance(error, OSError) else None) or (int(found.group(1)) if found else None)
    if code is None and ("RESOURCE_EXHAUSTED" in text or "No space left" in text or "Disk quota" in text):
        code = errno.EDQUOT if "Disk quota" in text else errno.ENOSPC
    if code:
        return _WRITE_FIXES.get(code, (os.strerror(code), "check that folder"))
    first = text.strip().splitlines()[0][:200] if text.strip() else ""
    return f"{type(error).__name__}{': ' + first if first else ''}", "check that folder"


def restore_newest_intact(manager, targets: dict, remove_damaged: bool = False):
    """The newest checkpoint whose items (`targets`: name -> shapes, None: as saved) read back and match their
    digests, and its metadata; each damaged step is reported in one line."""
    directory, failures = manager.directory, []
    args = ocp.args.Composite(meta=ocp.args.JsonRestore(), **{k: ocp.args.StandardRestore(v) for k, v in
                                                               targets.items()})
    for step in sorted(manager.all_steps(), reverse=True):
        try:
            restored = manager.restore(step, args=args)
            recorded = restored.meta.get("digest", {})
            for item in targets:
                if item in recorded and digest(jax.device_get(restored[item])) != recorded[item]:
                    raise ValueError(f"its {item} do not match the digest recorded when it was saved")
        except Exception as error:  # noqa: BLE001 - orbax and tensorstore raise many types for a damaged file
            reason = str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__
            failures.append(step)
            warn(f"checkpoint step {step} in {directory} is damaged ({reason}); trying the one before it")
            continue
        if failures:
            warn(f"using checkpoint step {step}, the newest intact one in {directory}")
            if remove_damaged:
                for bad in failures:
                    manager.delete(bad)
        return restored
    if failures:
        raise UserError(f"no intact checkpoint in {directory} (damaged steps: {', '.join(map(str, failures))}); "
                        "start the run again (--overwrite) or restore the folder from a backup")
    raise UserError(f"{directory} holds no finished checkpoint; train at least one epoch first")


def find_run(run_dir) -> Path:
    """The folder holding `checkpoints/`: run_dir itself, or its single sub-run."""
    run_dir = Path(run_dir)
    if (run_dir / CHECKPOINTS).is_dir():
        return run_dir
    if not run_dir.is_dir():
        raise UserError(f"{run_dir} is a file, not a run folder; pass the --out folder of a finished run first (for "
                        "predict: the run, then the images)" if run_dir.exists() else
                        f"run folder {run_dir} does not exist; pass the --out folder of a finished run")
    subruns = sorted(p for p in run_dir.iterdir() if (p / CHECKPOINTS).is_dir())
    if len(subruns) == 1:
        return subruns[0]
    if subruns:
        raise UserError(f"{run_dir} holds {len(subruns)} runs ({', '.join(p.name for p in subruns)}); "
                        f"pass one of them, for example {subruns[-1]}")
    raise UserError(f"{run_dir} holds no checkpoints; pass the --out folder of a run that finished an epoch")


def latest_epoch(run_dir) -> Optional[float]:
    """How many epochs the run's newest checkpoint holds (None without checkpoints), from its metadata alone."""
    directory = Path(run_dir).resolve() / CHECKPOINTS
    if not directory.is_dir():
        return None
    with ocp.CheckpointManager(directory) as manager, contextlib.suppress(Exception):  # damaged: restore reports it
        step = manager.latest_step()
        return None if step is None else \
            float(manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta["epoch"])
    return None


def continue_run(source, run) -> None:
    """Copy a finished run's checkpoints, frozen parameters and TensorBoard scalars into `run`, to resume there."""
    source, run = Path(source), Path(run)
    try:
        for name in (CHECKPOINTS, TENSORBOARD):
            if (source / name).is_dir():
                shutil.copytree(source / name, run / name, dirs_exist_ok=True)
        if (source / FROZEN).is_file():
            shutil.copy2(source / FROZEN, run / FROZEN)
    except OSError as error:
        raise user_error_from_os(error, f"cannot continue {source} in {run}") from None


def _frozen_file(run: Path) -> tuple:
    """(path, recorded SHA-256 or None) of the run's frozen parameters: its config.json's, or frozen_params.npz."""
    run = Path(run)
    try:
        ref = json.loads((run / CONFIG).read_text()).get("frozen_params")
    except (OSError, ValueError, AttributeError):
        ref = None
    if not isinstance(ref, dict) or not ref.get("path"):
        return run / FROZEN, None
    return (run / ref["path"]).resolve(), ref.get("sha256")


def write_frozen_file(frozen: dict, path: Path) -> None:
    """Write a frozen-parameter tree to `path` (atomically)."""
    with atomic_write(path, "wb") as f:
        np.savez(f, **{k: np.asarray(v) for k, v in traverse_util.flatten_dict(frozen, sep="/").items()})


def frozen_params(run: Path) -> dict:
    """The run's frozen parameters ({} when it has none), checked against the digest its config.json records."""
    path, recorded = _frozen_file(run)
    if not path.is_file():
        if recorded is not None:
            raise UserError(f"{path}, the frozen parameters of the run in {run}, is missing; restore it or start "
                            "the run again")
        return {}
    try:
        with np.load(path) as data:
            frozen = traverse_util.unflatten_dict({tuple(k.split("/")): data[k] for k in data.files})
    except Exception as error:  # noqa: BLE001
        raise UserError(f"{path} is damaged ({type(error).__name__}); the run's frozen parameters cannot be "
                        "restored: start the run again") from None
    if recorded is not None and digest(frozen) != recorded:
        raise UserError(f"{path} is not the frozen parameters the run in {run} recorded (its SHA-256 differs); "
                        "restore the run's own file or start the run again")
    return frozen


def load_variables(run_dir, average: bool = False) -> dict:
    """The newest intact checkpoint's {'params', 'batch_stats'} (host arrays, frozen parameters included); with
    `average`, their moving average where the run kept one."""
    run = find_run(run_dir).resolve()
    with ocp.CheckpointManager(run / CHECKPOINTS) as manager:
        variables = jax.device_get(restore_newest_intact(manager, {"variables": None}).variables)
    if average and "ema_params" not in variables:
        raise UserError(f"the run in {run} kept no moving average of its weights (ema_decay 0); evaluate its "
                        "weights instead")
    params, frozen = variables["ema_params" if average else "params"], frozen_params(run)
    batch_stats = variables.get("batch_stats", {})
    return {"params": join_frozen(params, frozen) if frozen else params,
            "batch_stats": join_frozen(variables.get("ema_batch_stats", {}), batch_stats) if average else batch_stats}
