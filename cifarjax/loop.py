"""Training loops with the original's semantics: `train_loop` (SimpleCNN) and `fine_tune_loop` (ResNet-18).

Both run `fit`: epochs over a seeded permutation, evaluation every `eval_every` steps and at each epoch end,
checkpoints at epoch ends (at most one per `checkpoint_seconds`, and the last epoch's always; and every
`checkpoint_every` steps), resumption from the newest intact checkpoint,
a guard that stops on a non-finite loss, and Ctrl-C or SIGTERM that stops cleanly with a resumable checkpoint. Same seed,
same machine: the same numbers, whether the devices sit in one process or several.
"""
from __future__ import annotations

import collections
import contextlib
import math
import signal
import socket
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import jax
import numpy as np
from tqdm import tqdm

from cifarjax import binding, distributed, runs
from cifarjax.augment import AugmentSpec, HostAugment, with_normalization
from cifarjax.batching import eval_indices, train_indices
from cifarjax.checkpoint import Checkpointer, continue_run, latest_epoch
from cifarjax.config import Config
from cifarjax.data import Split
from cifarjax.errors import EXIT_TERMINATED, Interrupted, Terminated, UserError, set_interrupt_advice
from cifarjax.features import backbone_features, cacheable
from cifarjax.files import write_json
from cifarjax.freezing import Freezing
from cifarjax.inputs import FeatureInputs, HostAugmentedInputs, ImageInputs
from cifarjax.models import Apply, build_model, init_variables
from cifarjax.optim import lr_at, make_optimizer
from cifarjax.phases import Phases
from cifarjax.sources import check_labels
from cifarjax.tblog import ScalarLog
from cifarjax.train import DataParallel, StepOptions, create_train_state


class NonFiniteLossError(UserError):
    """The training loss became NaN or infinite."""


def itstime(step: int, every: int) -> bool:
    """Whether an every-N-steps event is due at `step` (never when `every` is 0)."""
    return bool(every) and step % every == 0


@dataclass
class History:
    """What a run records: one dict per evaluation (metrics.jsonl); the original's per-epoch lists derive from
    it. `train_loop` returned (train_loss, val_accuracy, val_epoch); `fine_tune_loop` (train_accuracy,
    epoch_val_accuracy)."""
    records: list

    def _epoch_ends(self, key):
        return [r[key] for r in self.records if r.get("epoch_end")]

    train_loss = property(lambda self: self._epoch_ends("train_loss"))
    train_accuracy = property(lambda self: self._epoch_ends("train_accuracy"))
    epoch_val_accuracy = property(lambda self: self._epoch_ends("val_accuracy"))
    epoch_val_loss = property(lambda self: self._epoch_ends("val_loss"))
    val_accuracy = property(lambda self: [r["val_accuracy"] for r in self.records])
    val_epoch = property(lambda self: [r["epoch"] for r in self.records])

    def readings(self) -> dict:
        """Final, best and last-five-mean validation accuracy over the epoch-end evaluations (the mean is over
        `last_mean_epochs`: fewer than five when fewer ran)."""
        acc = self.epoch_val_accuracy
        if not acc:
            return {}
        return {"val_accuracy": acc[-1], "best_val_accuracy": max(acc), "best_epoch": int(np.argmax(acc)) + 1,
                "last5_mean_val_accuracy": float(np.mean(acc[-5:])), "last_mean_epochs": len(acc[-5:])}


@dataclass
class FitResult:
    """What `fit` returns: the history, the final weights (and their moving average), the time and speed."""
    history: History
    variables: dict  # final {'params', 'batch_stats'} on the host
    average: Optional[dict]  # the moving average of the weights, as variables, when the run kept one
    seconds: float  # training wall time, evaluations included (this process and any resumed ones)
    images_per_second: float  # trained images per second of the training phase
    val_predictions: Optional[np.ndarray] = None  # the final evaluation's predicted classes (None if none ran)
    this_process: Optional[dict] = None  # this fit's own figures, which add up (`Trainer.this_process`)

    @property
    def eval_variables(self) -> dict:
        return self.average if self.average is not None else self.variables


# The most training steps per call where `--steps-per-call` is auto (0): for a head on cached features (microseconds
# of work a step), and on a GPU or TPU for images of at most SMALL_IMAGES pixels a side, where dispatching a step
# takes about as long as computing it (a SimpleCNN or ResNet-18 step at 32x32). Elsewhere a step outlasts its
# dispatch (on a CPU; a ResNet at 224x224 on a GPU: milliseconds against well under one), and one step a call
# compiles fastest.
CHEAP_STEPS_PER_CALL, ACCELERATOR_STEPS_PER_CALL, SMALL_IMAGES = 64, 8, 64


def most_steps_per_call(config: Config, platform: str, cheap: bool) -> int:
    """The most training steps a call may run: `config.steps_per_call`, or when it is 0 (auto) the above."""
    if config.steps_per_call:
        return config.steps_per_call
    if cheap:
        return CHEAP_STEPS_PER_CALL
    return ACCELERATOR_STEPS_PER_CALL if platform != "cpu" and config.img_size <= SMALL_IMAGES else 1


def steps_per_call(most: int, start: int, intervals) -> int:
    """How many steps every call of a fit runs: the largest number up to `most` that divides the step it starts
    from and each interval at which something happens (the epoch, evaluations, step-counted checkpoints; 0:
    none). Calls then end on every event and run one compiled program (`train.train_steps`, or `train_step`
    for one step a call)."""
    every = math.gcd(start, *intervals)
    return max(d for d in range(1, min(most, every) + 1) if every % d == 0)


class LossTracker:
    """Per-step metrics kept on the device and read in bulk (no sync per step); checks they are finite."""

    def __init__(self, loss_sum=0.0, acc_sum=0.0, count=0):
        self.pending, self.loss_sum, self.acc_sum, self.count = [], loss_sum, acc_sum, count
        self.first_loss = None
        self.recent = []  # (step, loss) read since `take_recent` last ran: TensorBoard's per-step curve

    def add(self, step: int, metrics) -> None:
        self.pending.append((step, metrics))

    def flush(self) -> Optional[tuple]:
        """Fold pending metrics into the sums; returns (step, loss) of the first non-finite loss, if any.

        Each pending entry is the metrics of the call ending at its step (one step, or several: arrays)."""
        fetched = jax.device_get([m for _, m in self.pending])
        pending, self.pending = self.pending, []
        for (end, _), m in zip(pending, fetched):
            losses, accs = np.atleast_1d(m["loss"][0]), np.atleast_1d(m["accuracy"][0])
            for step, loss, acc in zip(range(end - len(losses) + 1, end + 1), losses.tolist(), accs.tolist()):
                if not math.isfinite(loss):
                    return step, loss
                self.first_loss = loss if self.first_loss is None else self.first_loss
                self.recent.append((step, loss))
                self.loss_sum += loss
                self.acc_sum += acc
                self.count += 1
        return None

    def mean(self):
        return self.loss_sum / max(self.count, 1), self.acc_sum / max(self.count, 1)

    def take_recent(self) -> Optional[tuple]:
        """(last step, mean loss) of the steps read since the last call, or None when there were none."""
        recent, self.recent = self.recent, []
        return (recent[-1][0], sum(loss for _, loss in recent) / len(recent)) if recent else None

    def reset(self):
        self.loss_sum, self.acc_sum, self.count = 0.0, 0.0, 0


class ResidentFeed:
    """The training data lives on the devices; a step receives only this process's rows of the indices."""

    def __init__(self, parallel: DataParallel, split: Split):
        self.parallel, self.data = parallel, parallel.replicate((split.images, split.labels))

    def __call__(self, idx: np.ndarray, step: int):
        return self.data, self.parallel.mine(idx, axis=idx.ndim - 2)

    def ahead(self, batches):
        """`batches` as they are: nothing to prepare."""
        return batches


class HostAugmentFeed:
    """Host augmentation: every process augments the whole global batch (so draws do not depend on how the
    devices are spread) and places its own rows; a step's data is then the batch itself, and its indices
    are the batch's own rows. `ahead` prepares the next calls' batches while the device runs the current one."""
    DEPTH = 2  # calls prepared ahead

    def __init__(self, parallel: DataParallel, split: Split, augment: HostAugment):
        self.parallel, self.split, self.augment = parallel, split, augment
        self.prepared = {}  # first step of a call -> (its indices, the Future of its placed batch), from `ahead`

    def __call__(self, idx: np.ndarray, step: int):
        """`idx`: one step's (devices, per_device) indices, or several steps' (steps, devices, per_device), the
        first of them `step`: the batch `ahead` prepared for them, else prepared now."""
        idx_future = self.prepared.pop(step, None)
        if idx_future is not None and np.array_equal(idx_future[0], idx):
            return idx_future[1].result()
        return self.prepare(idx, step)

    def prepare(self, idx: np.ndarray, step: int):
        """Each step's batch augmented with its own step's draws; a device holds its rows of every step."""
        steps = idx.reshape((-1,) + idx.shape[-2:])
        images = np.concatenate([self.augment(self.split.images[i], step + s) for s, i in enumerate(steps)], axis=1)
        labels = np.concatenate([self.split.labels[i] for i in steps], axis=1)
        per_device = idx.shape[-1]
        rows = np.arange(len(steps) * per_device, dtype=np.int32).reshape(len(steps), 1, per_device)
        rows = np.broadcast_to(rows, steps.shape).reshape(idx.shape)
        p = self.parallel
        return p.shard((p.mine(images), p.mine(labels))), p.mine(rows, axis=idx.ndim - 2)

    def ahead(self, batches):
        """`batches` ((last step, indices) per call, as `Trainer.batches` yields them) passed through, while one
        background thread prepares the next `DEPTH` calls' batches in order: the same batches, each from its own
        steps' draws. Closing it (the loop ended, failed or was interrupted) cancels what has not started and
        waits for the batch under way."""
        pool, queued = ThreadPoolExecutor(1, thread_name_prefix="host-augment"), collections.deque()
        try:
            for end, idx in batches:
                first = end - (len(idx) if idx.ndim == 3 else 1)
                self.prepared[first] = idx, pool.submit(self.prepare, idx, first)
                queued.append((end, idx))
                if len(queued) > self.DEPTH:
                    yield queued.popleft()
            while queued:
                yield queued.popleft()
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
            self.prepared.clear()


class _StopRequest:
    """The first Ctrl-C (or SIGTERM, what SLURM, Kubernetes and systemd send) asks the loop to stop after the
    current step (the state must not be lost mid-step); a second one interrupts at once.

    The request is announced at once, even while the main thread waits for the device and Python's handler
    cannot run yet: a helper thread reads the signal's byte from the wakeup file descriptor."""
    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, saves: bool = True):
        self.saves = saves  # whether stopping saves a checkpoint (a run folder), for the announcement
        self.requested = None  # the signal that asked to stop
        self.previous, self.reader, self.writer, self.previous_fd = None, None, None, -1

    def __enter__(self):
        try:
            self.previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        except ValueError:  # not the main thread
            self.previous = None
            return self
        self.reader, self.writer = socket.socketpair()
        self.writer.setblocking(False)
        self.previous_fd = signal.set_wakeup_fd(self.writer.fileno(), warn_on_full_buffer=False)
        threading.Thread(target=self._announce, daemon=True, name="cifarjax-stop").start()
        return self

    def _announce(self) -> None:
        seen = 0
        while True:
            try:
                data = self.reader.recv(16)
            except OSError:
                return
            if not data:
                return
            for signum in data:
                if signum in self.SIGNALS:
                    seen += 1
                    then = ", then saving a checkpoint" if self.saves else ""
                    sys.stderr.write(f"\nstopping after this step{then} (Ctrl-C again stops at once)\n" if seen == 1
                                     else "\nstopping now\n")
                    sys.stderr.flush()

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
        return False


class Trainer:
    """The state of one `fit`: the pmap-ed steps, the train state on the devices, the records, the
    checkpoints. `fit` reads top to bottom; this class does each job it names."""

    def __init__(self, config: Config, apply_fn, variables: dict, train: Split, val: Split, inputs, *,
                 run: Optional[Path], devices, host_augment: Optional[HostAugment], phases: Phases,
                 resume_hint: str, restart_hint: Optional[str] = None):
        self.config, self.run, self.phases, self.resume_hint = config, run, phases, resume_hint
        self.restart_hint = restart_hint  # the command that starts the run again, replacing it (its --lr last)
        self.train, self.val, self.variables = train, val, variables
        freezing = Freezing.from_config(config)
        trainable = None if freezing.everything_trains else freezing.trainable_mask(variables["params"])
        self.parallel = DataParallel(inputs, trainable, devices, StepOptions.from_config(config))
        self.steps_per_epoch = len(train) // config.batch_size
        train_indices(len(train), config.batch_size, self.parallel.n_devices, config.seed, 0)  # validates the batch
        self.total_steps = config.n_epochs * self.steps_per_epoch
        tx = make_optimizer(config, variables["params"], self.steps_per_epoch)
        self.state = create_train_state(apply_fn, variables, tx, config.seed, ema=config.ema_decay > 0,
                                        freezing=freezing)
        self.writer = run is not None and distributed.is_writer()
        self.checkpointer = Checkpointer(run, config.keep_checkpoints, trainable) if run is not None else None
        self.tracker, self.records, self.elapsed, self.saved = LossTracker(), [], 0.0, None
        self.val_predictions = None
        self.log = ScalarLog(run / runs.TENSORBOARD) if self.writer else None
        self.host_augment = host_augment
        self.most_per_call = most_steps_per_call(config, self.parallel.devices[0].platform,
                                                 getattr(inputs, "cheap_steps", False))

    # -- start
    def restore(self, resume: bool) -> None:
        """With `resume`, continue from the newest intact checkpoint (refusing fewer epochs than already
        trained); a new run writes its frozen parameters once."""
        if self.checkpointer is None:
            return
        latest = self.checkpointer.latest_step()
        if latest is not None and not resume:  # its steps would not be saved again: the folder would mix two runs
            raise UserError(f"{self.run} already holds a run's checkpoints (step {latest}); continue it with "
                            "resume=True, or train into another folder")
        if latest is None:
            self.checkpointer.write_frozen(self.variables["params"], distributed.is_writer())
            return
        self.state, meta = self.checkpointer.restore(self.state)
        done = int(self.state.step)
        if done > self.total_steps:
            raise UserError(f"the run in {self.run} already trained {done / self.steps_per_epoch:g} epochs; pass "
                            f"--epochs {math.ceil(done / self.steps_per_epoch)} or more to resume it")
        self.records = meta["records"]
        self.tracker = LossTracker(meta["loss_sum"], meta["acc_sum"], meta["count"])
        self.tracker.first_loss = meta.get("first_loss")
        self.elapsed, self.saved = meta["seconds"], (done, meta.get("train_loss"))
        set_interrupt_advice(f"its newest checkpoint (step {done}) is saved: resume with {self.resume_hint}")

    def start(self) -> None:
        """Place the data and the state on the devices and compile both steps (timed as compilation)."""
        if self.writer:
            if not (self.run / runs.CONFIG).exists():  # a run research code started: `load_run` needs its settings
                write_json(self.run / runs.CONFIG, binding.absolute_paths(self.config.to_dict()))
            runs.write_metrics(self.run, self.records)
        p = self.parallel
        self.feed = (HostAugmentFeed(p, self.train, self.host_augment) if self.host_augment
                     else ResidentFeed(p, self.train))
        self.val_data = p.replicate((self.val.images, self.val.labels))
        self.device_state = p.replicate(self.state)
        with self.phases("compilation", "compiling the evaluation step"):
            eval_idx = eval_indices(len(self.val), self.config.eval_batch_size, p.n_devices)[0][0]
            jax.block_until_ready(p.eval_step(self.device_state, self.val_data, p.mine(eval_idx)))
        self.start_step = self.last_step = int(self.state.step)
        self.chunk = steps_per_call(self.most_per_call, self.start_step,
                                    (self.steps_per_epoch, self.config.eval_every, self.config.checkpoint_every))
        self.last_checkpoint = time.perf_counter()
        self.compiled_programs, self.compiled_steps = set(), 0  # (idx.ndim of each program called, their steps)
        self.step_seconds = {True: 0.0, False: 0.0}  # this fit's compiling first calls, and the calls after them
        self.t0 = time.perf_counter() - self.elapsed

    # -- the loop's jobs
    def batches(self):
        """(last step, indices) per call from the restored step to the end, epoch by epoch (steps count from 1).

        Indices are (devices, per_device) for one step a call, or (steps, devices, per_device) for `self.chunk`
        steps, which divides the epoch and every interval (`steps_per_call`): no call crosses an event.
        """
        start, per_epoch, chunk = self.start_step, self.steps_per_epoch, self.chunk
        for epoch in range(start // per_epoch, self.config.n_epochs):
            epoch_idx = train_indices(len(self.train), self.config.batch_size, self.parallel.n_devices,
                                      self.config.seed, epoch)
            first = epoch * per_epoch
            for done in range(max(start, first) - first, per_epoch, chunk):
                yield first + done + chunk, epoch_idx[done] if chunk == 1 else epoch_idx[done:done + chunk]

    def step(self, step: int, idx: np.ndarray) -> None:
        """One call of training steps ending at `step` (one step, or `self.chunk` in a rolled scan). The first
        call compiles the program and is timed as compilation."""
        first = idx.ndim not in self.compiled_programs
        if first and self.compiled_programs:
            self.sync()  # the steps queued before are training, not this program's compilation
        message = "compiling the training step" if first and not self.compiled_programs else None
        start = time.perf_counter()
        with self.phases("compilation" if first else "training", message):
            if idx.ndim == 2:
                self.device_state, metrics = self.parallel.train_step(self.device_state, *self.feed(idx, step - 1))
            else:
                data, local = self.feed(idx, step - len(idx))
                self.device_state, metrics = self.parallel.train_steps(self.device_state, data, np.swapaxes(local, 0, 1))
            if first:
                jax.block_until_ready(metrics)
                self.compiled_programs.add(idx.ndim)
                self.compiled_steps += step - self.last_step
            self.tracker.add(step, metrics)
            self.last_step = step
            if len(self.tracker.pending) >= 25:
                self.check_finite()
        self.step_seconds[first] += time.perf_counter() - start

    def epoch_end(self, step: int) -> bool:
        return step % self.steps_per_epoch == 0

    def checkpoint_due(self, step: int) -> bool:
        """Whether to checkpoint after `step`: every `checkpoint_every` steps and after the last; at the other
        epoch ends, once `checkpoint_seconds` passed since the last checkpoint (process 0's clock decides for
        every process). A checkpoint costs about as much as an epoch of a head on cached features (orbax: 0.1 s
        for 5,000 parameters), so short epochs are not each checkpointed."""
        if self.checkpointer is None:
            return False
        if itstime(step, self.config.checkpoint_every) or step == self.total_steps:
            return True
        if not self.epoch_end(step):
            return False
        self.sync()  # no step may be queued when process 0's choice is broadcast
        return distributed.writer_decides(time.perf_counter() - self.last_checkpoint >= self.config.checkpoint_seconds)

    def sync(self) -> None:
        """Wait for the queued training steps, so their time counts as training (dispatch is asynchronous: a
        step's call returns before the step has run)."""
        start = time.perf_counter()
        with self.phases("training"):
            jax.block_until_ready(self.device_state)
        self.step_seconds[False] += time.perf_counter() - start

    def check_finite(self) -> None:
        """Read the queued steps' metrics (every 25 calls, and before evaluations and checkpoints): stop on a
        non-finite loss, and give TensorBoard the mean training loss of the steps read."""
        bad = self.tracker.flush()
        if bad is not None:
            raise self.non_finite(*bad)
        recent = self.tracker.take_recent()
        if self.log is not None and recent is not None:
            self.log.write(recent[0], {"train/loss_recent_steps": recent[1]})

    def evaluate(self, step: int) -> dict:
        self.sync()
        self.check_finite()
        with self.phases("evaluation"):
            preds, losses = self.parallel.evaluate(self.device_state, self.val_data, len(self.val),
                                                   self.config.eval_batch_size)
        self.val_predictions = preds if step == self.total_steps else None
        loss, acc = self.tracker.mean()
        record = {"step": step, "epoch": round(step / self.steps_per_epoch, 4), "train_loss": loss,
                  "train_accuracy": acc, "val_accuracy": float(np.mean(preds == self.val.labels)),
                  "val_loss": float(np.mean(losses)), "lr": lr_at(self.config, self.steps_per_epoch, step - 1),
                  "wall_seconds": round(time.perf_counter() - self.t0, 3)}
        if self.epoch_end(step):
            record["epoch_end"] = True
            self.tracker.reset()
        self.records.append(record)
        if self.writer:
            runs.append_metrics(self.run, record)
            self.log.write(step, {"train/loss": loss, "train/accuracy": acc, "val/accuracy": record["val_accuracy"],
                                  "val/loss": record["val_loss"], "lr": record["lr"],
                                  "images_per_second": self.images_per_second()})
        return record

    def save(self, step: int) -> None:
        """Checkpoint the state after `step` (its losses were checked finite)."""
        if self.checkpointer is None or (self.saved and self.saved[0] == step):
            return
        self.sync()
        self.check_finite()
        with self.phases("checkpoints"):
            loss = self.records[-1]["train_loss"] if self.records and self.records[-1]["step"] == step else None
            meta = {"records": self.records, "loss_sum": self.tracker.loss_sum, "acc_sum": self.tracker.acc_sum,
                    "count": self.tracker.count, "first_loss": self.tracker.first_loss,
                    "seconds": time.perf_counter() - self.t0, "epoch": step / self.steps_per_epoch,
                    "train_loss": loss}
            self.checkpointer.save(self.parallel.unreplicate(self.device_state), meta)
            self.saved = (step, loss)
            self.last_checkpoint = time.perf_counter()
            set_interrupt_advice(f"its newest checkpoint (step {step}) is saved: resume with {self.resume_hint}")

    def non_finite(self, step: int, loss: float) -> NonFiniteLossError:
        """The error for a non-finite loss, with advice that works when followed."""
        where = f"the newest checkpoint (step {self.saved[0]}) is kept in {self.run}" if self.saved else \
            "no checkpoint was written yet"
        if step == 1:
            return NonFiniteLossError(
                f"training loss is {loss} at the very first step, before any update: the inputs or the starting "
                "weights hold NaN or infinite values (check the data, --normalize and --weights); the learning "
                "rate is not the cause")
        lower = f"{self.config.lr / 10:g}"
        exploded = self.saved and self.saved[1] is not None and self.tracker.first_loss is not None and \
            self.saved[1] > 10 * self.tracker.first_loss
        if self.saved and not exploded:
            advice = f"resume from it with a lower learning rate: {self.resume_hint} --lr {lower}"
        elif self.restart_hint:
            advice = f"start again with a lower learning rate, replacing this run: {self.restart_hint} --lr {lower}"
        else:
            advice = f"start again with a lower learning rate ({lower}) in a new run folder"
        return NonFiniteLossError(f"training loss became {loss} at step {step}; stopped ({where}); the learning "
                                  f"rate {self.config.lr:g} is probably too high: {advice}")

    def interrupted(self, step: int, signum: int = signal.SIGINT) -> Interrupted:
        how = "terminated (SIGTERM)" if signum == signal.SIGTERM else "interrupted"
        if self.checkpointer is None:
            error = Interrupted(f"{how} at step {step}; nothing was saved (no run folder)")
        else:
            error = Interrupted(f"{how} at step {step} (epoch {step / self.steps_per_epoch:.2f}); a checkpoint "
                                f"was saved: resume with {self.resume_hint}")
        if signum == signal.SIGTERM:
            error.exit_code = EXIT_TERMINATED
        return error

    def interrupted_at_once(self, terminated: bool = False) -> Interrupted:
        """A second Ctrl-C (or a signal before the loop started): what is saved, truthfully."""
        how = "terminated (SIGTERM)" if terminated else "interrupted at once"
        if self.checkpointer is None:
            error = Interrupted(f"{how}; nothing was saved (no run folder)")
        elif self.saved:
            error = Interrupted(f"{how}; the newest checkpoint (step {self.saved[0]}, epoch "
                                f"{self.saved[0] / self.steps_per_epoch:g}) is kept in {self.run}: resume with "
                                f"{self.resume_hint}")
        else:
            error = Interrupted(f"{how} before the first checkpoint, so nothing is saved yet; the run folder "
                                f"{self.run} is kept: {self.resume_hint} starts it from the beginning")
        if terminated:
            error.exit_code = EXIT_TERMINATED
        return error

    def images_per_second(self) -> float:
        """Trained images per second of this fit, compilation and evaluation excluded. When every step ran in the
        first (compiling) call, as a short run on cached features does, that call counts: a lower bound."""
        steps = self.last_step - self.start_step - self.compiled_steps
        seconds = self.step_seconds[False]
        if steps <= 0 or seconds <= 0:
            steps, seconds = self.last_step - self.start_step, seconds + self.step_seconds[True]
        return steps * self.config.batch_size / seconds if steps > 0 and seconds > 0 else 0.0

    def this_process(self) -> dict:
        """This fit's figures, which add up: `images_trained` in this process; each program's first call's
        `compile_seconds` (compilation and its `compile_images`); then `training_seconds` of steps (waiting for
        them included) at `images_per_second`. All zero when the fit had nothing left to train."""
        steps, batch = self.last_step - self.start_step, self.config.batch_size
        return {"images_trained": steps * batch, "compile_seconds": round(self.step_seconds[True], 2),
                "compile_images": self.compiled_steps * batch, "training_seconds": round(self.step_seconds[False], 2),
                "images_per_second": round(self.images_per_second(), 1)}

    def result(self) -> FitResult:
        final = self.parallel.unreplicate(self.device_state)
        average = None if final.ema_params is None else final.eval_variables
        return FitResult(History(self.records), {"params": final.params, "batch_stats": final.batch_stats}, average,
                         time.perf_counter() - self.t0, self.images_per_second(), self.val_predictions,
                         self.this_process())

    def close(self, graceful: bool) -> None:
        if self.log is not None:
            self.log.close()
        if self.checkpointer is not None and graceful:
            self.checkpointer.close()


def fit(config: Config, apply_fn, variables: dict, train: Split, val: Split, inputs, *, run: Optional[Path] = None,
        resume: bool = False, devices=None, desc: str = "train", host_augment: Optional[HostAugment] = None,
        phases: Optional[Phases] = None, resume_hint: str = "--resume", restart_hint: Optional[str] = None,
        continue_from: Optional[Path] = None) -> FitResult:
    """Train `variables` under `apply_fn` on `train` (images or features), evaluating on `val`.

    With `run`, metrics go to run/metrics.jsonl, scalars to run/tensorboard and checkpoints to run/checkpoints;
    with `resume`, training continues from the newest intact checkpoint and ends exactly where an
    uninterrupted run would. `continue_from`, the folder of a finished run of the same configuration but fewer
    epochs, makes a run without checkpoints of its own start as that run resumed here (`continue_run`): only
    exact when the learning rate does not depend on the number of epochs (`optim.rate_depends_on_length`).
    `resume_hint` and `restart_hint`: the commands that resume the run and start it again (errors give them).
    """
    if not isinstance(inputs, FeatureInputs):
        train.check_images("the training images"), val.check_images("the validation images")
    if not len(val):
        raise UserError("the validation split is empty; give it at least one image")
    check_labels(train.labels, config.num_classes, "training labels")
    check_labels(val.labels, config.num_classes, "validation labels")
    if run is not None:
        runs.claim(run)
        distributed.barrier(f"claimed {run}")  # every process checked the folder before process 0 marks it
        if distributed.is_writer() and not runs.is_run(run):
            runs.create(Path(run), "python")
        distributed.barrier(f"marked {run}")
    if run is not None and continue_from is not None:
        fresh = latest_epoch(run) is None
        distributed.barrier(f"checked {run}")  # every process decides before process 0 copies anything
        if fresh:
            if distributed.is_writer():
                continue_run(continue_from, run)
            distributed.barrier(f"continued {run}")
            resume = True
    trainer = Trainer(config, apply_fn, variables, train, val, inputs, run=Path(run) if run else None,
                      devices=devices, host_augment=host_augment, phases=phases or Phases(announce=False),
                      resume_hint=resume_hint, restart_hint=restart_hint)
    graceful = True
    try:
        trainer.restore(resume)
        trainer.start()
        _train(trainer, desc)
        return trainer.result()
    except KeyboardInterrupt as interrupt:
        raise trainer.interrupted_at_once(isinstance(interrupt, Terminated)) from None
    except Exception as error:
        if distributed.is_peer_failure(error):
            graceful = False
            raise distributed.peer_lost(error, resume_hint) from None
        raise
    finally:
        trainer.close(graceful)


def _train(trainer: Trainer, desc: str) -> None:
    """The loop itself: step, evaluate when it is time, checkpoint when due, stop cleanly on Ctrl-C."""
    config, bar = trainer.config, None
    try:
        with _StopRequest(saves=trainer.checkpointer is not None) as stop, \
                contextlib.closing(trainer.feed.ahead(trainer.batches())) as batches:
            for step, idx in batches:
                trainer.step(step, idx)
                if bar is None:  # made after the first step, which compiled it: the ETA never counts compilation
                    bar = tqdm(total=trainer.total_steps, initial=step, desc=desc, unit="step", mininterval=1.0,
                               dynamic_ncols=True, disable=not distributed.is_writer())
                else:
                    bar.update(step - bar.n)  # a call may run several (cheap) steps
                if itstime(step, config.eval_every) or trainer.epoch_end(step):
                    bar.set_postfix_str("evaluating", refresh=True)
                    record = trainer.evaluate(step)
                    bar.set_postfix(epoch=f"{record['epoch']:g}", loss=f"{record['train_loss']:.4f}",
                                    val=f"{record['val_accuracy']:.3f}")
                if trainer.checkpoint_due(step):
                    trainer.save(step)
                if stop.requested is not None:
                    trainer.save(step)
                    raise trainer.interrupted(step, stop.requested)
    finally:  # however the loop ends, so that an error message that follows starts on a line of its own
        if bar is not None:
            bar.close()
    trainer.sync()
    trainer.check_finite()


# ---------------------------------------------------------------------------------------------- the original's loops

def _image_inputs(config: Config):
    spec = AugmentSpec.from_config(config)
    return HostAugmentedInputs(spec) if config.augment_backend == "albumentations" else ImageInputs(spec)


def _host_augment(config: Config) -> Optional[HostAugment]:
    return HostAugment(seed=config.seed) if config.augment_backend == "albumentations" \
        else None


def train_loop(config: Config, train: Split, val: Split, variables: Optional[dict] = None, *,
               run: Optional[Path] = None, resume: bool = False, devices=None, phases: Optional[Phases] = None,
               resume_hint: str = "--resume", restart_hint: Optional[str] = None) -> FitResult:
    """The original's train_loop: train the configured model (SimpleCNN by default) from scratch."""
    train.check_images("the training images"), val.check_images("the validation images")
    config = with_normalization(config.validate(), train.images)
    model = build_model(config)
    variables = variables if variables is not None else init_variables(model, config)
    return fit(config, Apply(model), variables, train, val, _image_inputs(config), run=run, resume=resume,
               devices=devices, desc="train", host_augment=_host_augment(config), phases=phases,
               resume_hint=resume_hint, restart_hint=restart_hint)


def fine_tune_loop(config: Config, variables: dict, train: Split, val: Split, *, run: Optional[Path] = None,
                   resume: bool = False, devices=None, features=None, phases: Optional[Phases] = None,
                   resume_hint: str = "--resume", restart_hint: Optional[str] = None,
                   continue_from: Optional[Path] = None) -> FitResult:
    """The original's fine_tune_loop: train a ResNet-18's unfrozen part (default: the head).

    When the backbone is fixed (`features.cacheable`), the head trains on cached backbone features (pass
    `features` from `features.backbone_features` to share them between runs); otherwise every step runs the
    network on the images. `continue_from`: as `fit`'s.
    """
    train.check_images("the training images"), val.check_images("the validation images")
    config = with_normalization(config.validate(), train.images)
    model = build_model(config)
    kw = dict(run=run, resume=resume, devices=devices, phases=phases, resume_hint=resume_hint,
              restart_hint=restart_hint, continue_from=continue_from)
    if cacheable(config):
        if features is None:
            with (phases or Phases(announce=False))("feature_extraction", "extracting backbone features"):
                features = backbone_features(config, model, variables, train, val, devices)
        return fit(config, Apply(model, "classify"), variables, *features, FeatureInputs(AugmentSpec.from_config(config)),
                   desc="fine-tune (cached features)", **kw)
    return fit(config, Apply(model), variables, train, val, _image_inputs(config), desc="fine-tune",
               host_augment=_host_augment(config), **kw)
