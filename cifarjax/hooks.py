"""The hooks `loop.fit` tells (progress bar, metrics, report) and the stop request it listens to. A hook defines any
of `after_call(trainer, call)`, `after_evaluation(trainer, record)`, `after_checkpoint(trainer, step)` and
`at_end(trainer)` (however the fit ends; `trainer.finished` when it ran to its end), and may call `trainer.stop()`."""
from __future__ import annotations

import contextlib
import functools
import signal
import socket
import sys
import threading

from tqdm import tqdm

from cifarjax import distributed, plots, runs
from cifarjax.errors import best_effort, warn
from cifarjax.runs import write_json
from cifarjax.predictor import score
from cifarjax.records import History


def tell(hooks, moment: str, *args) -> None:
    """Tell each of `hooks` that defines `moment` (`tell(hooks, "after_call", trainer, call)`)."""
    for hook in hooks:
        getattr(hook, moment, lambda *_: None)(*args)


class Progress:
    """The progress bar (process 0), made after the first call, which compiled: its ETA never counts compilation."""

    def __init__(self, desc: str):
        self.desc, self.bar = desc, None

    def after_call(self, trainer, call) -> None:
        if self.bar is None:
            self.bar = tqdm(total=trainer.total_steps, initial=call.end, desc=self.desc, unit="step", mininterval=1.0,
                            dynamic_ncols=True, disable=not distributed.is_writer())
        else:
            self.bar.update(call.end - self.bar.n)  # a call may run several (cheap) steps
        if call.evaluate:
            self.bar.set_postfix_str("evaluating", refresh=True)

    def after_evaluation(self, trainer, record: dict) -> None:
        self.bar.set_postfix(epoch=f"{record['epoch']:g}", loss=f"{record['train_loss']:.4f}",
                             val=f"{record['val_accuracy']:.3f}")

    def at_end(self, trainer) -> None:
        if self.bar is not None:  # so that an error message that follows starts on a line of its own
            self.bar.close()


class Metrics:
    """Each evaluation's record in metrics.jsonl and as TensorBoard scalars, with the mean training loss of the steps
    read between writes. Without TensorBoard, or on a full disk, the run goes on without event files, said once."""

    def __init__(self, run):
        self.run, self.writer = run, None
        try:
            from tensorboard.summary import Writer
        except ImportError:
            warn("TensorBoard is not installed, so no event files are written; pip install 'cifarjax[tensorboard]'",
                 key="tensorboard")
            return
        if getattr(threading.excepthook, "func", None) is not _quiet_writer_thread:
            threading.excepthook = functools.partial(_quiet_writer_thread, previous=threading.excepthook)
        folder = self.folder = run / runs.TENSORBOARD
        before = set(folder.glob("events.out.tfevents.*"))
        self.writer = best_effort(lambda: Writer(str(folder)), f"TensorBoard event files in {folder}")
        for path in set(folder.glob("events.out.tfevents.*")) - before:
            runs.RunFolder.record(path)  # the run folder's manifest lists it, so --overwrite removes it and only it

    def write(self, step: int, scalars: dict) -> None:
        def write():
            for tag, value in scalars.items():
                if value is not None:
                    self.writer.add_scalar(tag, float(value), int(step))
            self.writer.flush()
            return True
        if self.writer is not None and not best_effort(write, f"TensorBoard event files in {self.folder}", False):
            self.writer = None  # a full disk: the run goes on without them, said once

    def recent_loss(self, trainer, *_) -> None:
        recent = trainer.tracker.take_recent()
        if recent is not None:
            self.write(recent[0], {"train/loss_recent_steps": recent[1]})

    after_call = after_checkpoint = recent_loss

    def after_evaluation(self, trainer, record: dict) -> None:
        self.recent_loss(trainer)
        runs.RunFolder(self.run).append_metrics(record)
        self.write(record["step"], {"train/loss": record["train_loss"], "train/accuracy": record["train_accuracy"],
                                    "val/accuracy": record["val_accuracy"], "val/loss": record["val_loss"],
                                    "lr": record["lr"], "images_per_second": trainer.chrono.images_per_second()})

    def at_end(self, trainer) -> None:
        self.recent_loss(trainer)
        if self.writer is not None:
            best_effort(self.writer.close, f"TensorBoard event files in {self.folder}")


class Report:
    """A finished fit's summary.json and plots in its run folder, as the commands write theirs."""

    def at_end(self, trainer) -> None:
        if not trainer.finished:
            return
        history, config, run = History(trainer.records), trainer.config, trainer.run
        summary = {"experiment": "python", "recipe": config.recipe, "epochs": config.n_epochs, **history.readings(),
                   "train_accuracy": history.train_accuracy[-1], "train_loss": history.train_loss[-1],
                   "val_accuracy_per_epoch": history.epoch_val_accuracy,
                   "train_accuracy_per_epoch": history.train_accuracy, "stopped_early": trainer.stopping,
                   "wall_seconds": round(trainer.chrono.seconds(), 2),
                   "images_per_second": round(trainer.chrono.images_per_second(), 1),
                   "this_process": trainer.chrono.this_process(),
                   "evaluated_weights": "moving average" if config.ema_decay > 0 else "final"}
        write_json(run / runs.SUMMARY, summary)
        plots.plot_training_results(trainer.records, run / runs.PLOTS / "training_results.png",
                                    title=runs.run_name(run), label_smoothing=config.label_smoothing)
        preds, val = trainer.val_predictions, trainer.val
        if preds is not None and config.classes:
            matrix = score(val.labels, preds, config.classes)["confusion_matrix"]
            plots.plot_split(run, "val", val, preds, matrix, config.classes)


def _quiet_writer_thread(args, previous):
    """`previous` threading.excepthook but for TensorBoard's writer thread (a full disk, a path too long): the writer
    raises the same error where it writes next, and that becomes one warning line."""
    if not type(args.thread).__module__.startswith("tensorboard."):
        previous(args)


class StopRequest:
    """The first Ctrl-C (or SIGTERM) stops the loop after the current step, a second at once; a thread reading the
    wakeup file descriptor announces the request even while the main thread waits for the device. `saves`: whether
    stopping saves a checkpoint (a run folder), for the announcement; `requested`: the signal that asked to stop."""
    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, saves: bool = True):
        self.saves, self.requested, self.previous = saves, None, None  # previous: the handlers before, while replaced

    def __enter__(self):
        try:
            self.previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        except ValueError:  # not the main thread
            return self
        self.reader, self.writer = socket.socketpair()
        self.writer.setblocking(False)
        self.previous_fd = signal.set_wakeup_fd(self.writer.fileno(), warn_on_full_buffer=False)
        threading.Thread(target=self._announce, daemon=True, name="cifarjax-stop").start()
        return self

    def _announce(self) -> None:
        seen = 0
        with contextlib.suppress(OSError):
            while data := self.reader.recv(16):
                for _ in filter(self.SIGNALS.__contains__, data):
                    seen += 1
                    then = ", then saving a checkpoint" if self.saves else ""
                    print(f"\nstopping after this step{then} (Ctrl-C again stops at once)" if seen == 1 else
                          "\nstopping now", file=sys.stderr, flush=True)

    def _handle(self, signum, _frame):
        if self.requested is not None:
            raise KeyboardInterrupt
        self.requested = signum

    def __exit__(self, *exc):
        if self.previous is not None:
            signal.set_wakeup_fd(self.previous_fd)
            for s, handler in self.previous.items():
                signal.signal(s, handler)
            self.writer.close()
            self.reader.shutdown(socket.SHUT_RDWR)
            self.reader.close()
