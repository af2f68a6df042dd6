"""Scalars (losses, accuracies, learning rate, images per second at evaluations; the training loss of the recent
steps every 25 steps) as TensorBoard event files in the run folder,
written with TensorBoard's own numpy-only writer (`tensorboard.summary.Writer`, the `tensorboard` extra).

    tensorboard --logdir runs/          # then open http://localhost:6006

Without the package installed, runs go on and say once how to get it.
"""
from __future__ import annotations

import threading
from pathlib import Path

from cifarjax.errors import warn
from cifarjax.files import best_effort, record_output


class ScalarLog:
    """Write {tag: value} scalars at a step to `folder`; a no-op when TensorBoard is not installed."""

    def __init__(self, folder: Path):
        self.writer = None
        try:
            from tensorboard.summary import Writer
        except ImportError:
            warn("TensorBoard is not installed, so no event files are written; pip install 'cifarjax[tensorboard]'",
                 key="tensorboard")
            return
        if not hasattr(threading.excepthook, "quiets_tensorboard"):
            threading.excepthook = _quiet_writer_thread(threading.excepthook)
        folder = self.folder = Path(folder)
        before = set(folder.glob("events.out.tfevents.*"))
        self.writer = best_effort(lambda: Writer(str(folder)), f"TensorBoard event files in {folder}")
        for path in set(folder.glob("events.out.tfevents.*")) - before:
            record_output(path)  # the run folder's manifest lists it, so --overwrite removes it and only it

    def write(self, step: int, scalars: dict) -> None:
        if self.writer is None:
            return
        def write():
            for tag, value in scalars.items():
                if value is not None:
                    self.writer.add_scalar(tag, float(value), int(step))
            self.writer.flush()
            return True
        if not best_effort(write, f"TensorBoard event files in {self.folder}", fallback=False):
            self.writer = None  # a full disk: the run goes on without them, said once

    def close(self) -> None:
        if self.writer is not None:
            best_effort(self.writer.close, f"TensorBoard event files in {self.folder}")
            self.writer = None


def _quiet_writer_thread(previous):
    """A `threading.excepthook` that leaves out the traceback of TensorBoard's writer thread (a path too long, a full
    disk): the writer raises the same error in the thread that writes next, where it becomes one warning line."""
    def hook(args):
        if not type(args.thread).__module__.startswith("tensorboard."):
            previous(args)
    hook.quiets_tensorboard = True
    return hook
