"""The original's `train_loop` (SimpleCNN) and `fine_tune_loop` (ResNet-18) over `fit`: the calls `schedule.batches`
lays out, told to `hooks`; a fit resumes, and stops on a non-finite loss or on Ctrl-C or SIGTERM with a checkpoint."""
from __future__ import annotations

import contextlib
import math
import signal
import time
from pathlib import Path
from typing import Optional, Sequence

import jax
import numpy as np

from cifarjax import distributed, runs, schedule, target
from cifarjax.augment import AugmentSpec, HostAugment, with_normalization
from cifarjax.checkpoint import Checkpointer, continue_run, latest_epoch
from cifarjax.config import Config
from cifarjax.data import Split, eval_indices, train_indices
from cifarjax.errors import NonFiniteLossError  # noqa: F401 - importable from here, as before
from cifarjax.errors import (Terminated, UserError, interrupted, interrupted_at_once, non_finite_loss,
                             set_interrupt_advice)
from cifarjax.runs import write_json
from cifarjax.freezing import Freezing
from cifarjax.hooks import Metrics, Progress, Report, StopRequest, tell
from cifarjax.inputs import (FeatureInputs, HostAugmentedInputs, HostAugmentFeed, ImageInputs, ResidentFeed,
                             backbone_features, cacheable)
from cifarjax.models import Apply, build_model, init_variables
from cifarjax.optim import lr_at, make_optimizer
from cifarjax.phases import Chrono, Phases
from cifarjax.records import FitResult, History, LossTracker
from cifarjax.sources import check_labels
from cifarjax.train import DataParallel, StepOptions, create_train_state


class Trainer:
    """One fit's state: the pmap-ed steps, the train state on the devices, the records, the checkpoints."""

    def __init__(self, config: Config, apply_fn, variables: dict, train: Split, val: Split, inputs, *,
                 run: Optional[Path], devices, host_augment: Optional[HostAugment], phases: Phases,
                 resume_hint: str, restart_hint: Optional[str] = None):
        self.config, self.run, self.phases, self.resume_hint = config, run, phases, resume_hint
        self.restart_hint = restart_hint  # the command that starts the run again, replacing it (its --lr last)
        self.train, self.val, self.variables, self.host_augment = train, val, variables, host_augment
        self.cheap = getattr(inputs, "cheap_steps", False)
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
        self.val_predictions, self.stopping, self.finished = None, False, False

    def stop(self) -> None:
        """End the fit after the current call with a checkpoint (a hook's early stop; every process at one call)."""
        self.stopping = True

    def restore(self, resume: bool) -> None:
        """With `resume`, continue from the newest intact checkpoint; a new run writes its frozen parameters."""
        if self.checkpointer is None:
            return
        latest = self.checkpointer.manager.latest_step()
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
        self.records, self.elapsed = meta["records"], meta["seconds"]
        self.tracker = LossTracker(meta["loss_sum"], meta["acc_sum"], meta["count"], meta.get("first_loss"))
        self.saved_at(done, meta.get("train_loss"))

    def start(self) -> None:
        """Place the data and state on the devices, compile the evaluation step, lay out the calls."""
        if self.writer:
            if not (self.run / runs.CONFIG).exists():  # a run research code started: `load_run` needs its settings
                write_json(self.run / runs.CONFIG, runs.absolute_paths(self.config.to_dict()))
            runs.RunFolder(self.run).write_metrics(self.records)
        p = self.parallel
        self.feed = (HostAugmentFeed(p, self.train, self.host_augment) if self.host_augment
                     else ResidentFeed(p, self.train))
        self.val_data = p.replicate((self.val.images, self.val.labels))
        self.device_state = p.replicate(self.state)
        with self.phases("compilation", "compiling the evaluation step"):
            eval_idx = eval_indices(len(self.val), self.config.eval_batch_size, p.n_devices)[0][0]
            jax.block_until_ready(p.eval_step(self.device_state, self.val_data, p.mine(eval_idx)))
        start = int(self.state.step)
        calls = schedule.batches(self.config, len(self.train), start, p.n_devices, target.resolve(), self.cheap)
        self.batches = self.feed.ahead(calls)
        self.chrono = Chrono(self.phases, self.config.batch_size, self.elapsed, start)

    def step(self, call: schedule.Call, idx: np.ndarray) -> None:
        """One call of training steps (one, or several in a scan); the first compiles, timed as compilation."""
        with self.chrono.training(call.end) as compiling:
            data, local = self.feed(idx, call.first)
            steps, local = ((self.parallel.train_steps, np.swapaxes(local, 0, 1)) if call.steps > 1  # the scan's axis
                            else (self.parallel.train_step, local))
            self.device_state, metrics = steps(self.device_state, data, local)
            if compiling:
                jax.block_until_ready(metrics)
            self.tracker.pending.append((call.end, metrics))
            if len(self.tracker.pending) >= 25:
                self.sync(wait=False)

    def checkpoint_due(self, call: schedule.Call) -> bool:
        """Whether to checkpoint after `call`: when the schedule says so; at other epoch ends once `checkpoint_seconds`
        passed (process 0's clock decides), as a checkpoint costs about an epoch of a head on cached features."""
        if self.checkpointer is None or call.checkpoint or not call.epoch_end:
            return self.checkpointer is not None and call.checkpoint
        self.sync()  # no step may be queued when process 0's choice is broadcast (at an epoch end, evaluated already)
        return distributed.writer_decides(time.perf_counter() - self.chrono.last_checkpoint
                                          >= self.config.checkpoint_seconds)

    def sync(self, wait: bool = True) -> None:
        """Read the queued steps' metrics (every 25 calls, before evaluations and checkpoints): stop if non-finite;
        `wait` for the steps first, so their time counts as training."""
        if wait:
            with self.chrono.training():
                jax.block_until_ready(self.device_state)
        bad = self.tracker.flush()
        if bad is not None:
            raise non_finite_loss(*bad, self.config.lr, self.saved, self.tracker.first_loss, self.run,
                                  self.resume_hint, self.restart_hint)

    def evaluate(self, step: int) -> dict:
        """Evaluate the state after `step` on the validation split: its record."""
        self.sync()
        with self.phases("evaluation"):
            preds, losses = self.parallel.evaluate(self.device_state, self.val_data, len(self.val),
                                                   self.config.eval_batch_size)
        self.val_predictions = preds if step == self.total_steps else None
        loss, acc = self.tracker.mean()
        record = {"step": step, "epoch": round(step / self.steps_per_epoch, 4), "train_loss": loss,
                  "train_accuracy": acc, "val_accuracy": float(np.mean(preds == self.val.labels)),
                  "val_loss": float(np.mean(losses)), "lr": lr_at(self.config, self.steps_per_epoch, step - 1),
                  "wall_seconds": round(self.chrono.seconds(), 3)}
        if step % self.steps_per_epoch == 0:
            record["epoch_end"] = True
            self.tracker.reset()
        self.records.append(record)
        return record

    def save(self, step: int) -> bool:
        """Checkpoint the state after `step`; False without a run folder or when that step is saved already."""
        if self.checkpointer is None or (self.saved and self.saved[0] == step):
            return False
        self.sync()
        with self.phases("checkpoints"):
            loss = self.records[-1]["train_loss"] if self.records and self.records[-1]["step"] == step else None
            t = self.tracker
            meta = {"records": self.records, "loss_sum": t.loss_sum, "acc_sum": t.acc_sum, "count": t.count,
                    "first_loss": t.first_loss, "seconds": self.chrono.seconds(), "epoch": step / self.steps_per_epoch,
                    "train_loss": loss}
            self.checkpointer.save(self.parallel.unreplicate(self.device_state), meta)
            self.chrono.last_checkpoint = time.perf_counter()
            self.saved_at(step, loss)
        return True

    def saved_at(self, step: int, train_loss) -> None:
        self.saved = (step, train_loss)
        set_interrupt_advice(f"its newest checkpoint (step {step}) is saved: resume with {self.resume_hint}")

    def result(self) -> FitResult:
        final = self.parallel.unreplicate(self.device_state)
        average = None if final.ema_params is None else final.eval_variables
        return FitResult(History(self.records), final.variables, average, self.chrono.seconds(),
                         self.chrono.images_per_second(), self.val_predictions, self.chrono.this_process())


def fit(config: Config, apply_fn, variables: dict, train: Split, val: Split, inputs, *, run: Optional[Path] = None,
        resume: bool = False, devices=None, desc: str = "train", host_augment: Optional[HostAugment] = None,
        phases: Optional[Phases] = None, resume_hint: str = "--resume", restart_hint: Optional[str] = None,
        continue_from: Optional[Path] = None, hooks: Sequence = (), report: bool = True) -> FitResult:
    """Train `variables` on `train`, evaluating on `val`; `run`: the folder of metrics, checkpoints (`resume` goes on
    from the newest) and with `report` summary.json and plots/; `continue_from`: a finished shorter run to start from
    (exact unless `flags.rate_depends_on_length`); `*_hint`: commands errors give; `hooks`: `cifarjax.hooks`."""
    if not isinstance(inputs, FeatureInputs):
        train.check_images("the training images"), val.check_images("the validation images")
    if not len(val):
        raise UserError("the validation split is empty; give it at least one image")
    check_labels(train.labels, config.num_classes, "training labels")
    check_labels(val.labels, config.num_classes, "validation labels")
    resume = _claim(run, resume, continue_from) if run is not None else resume
    trainer = Trainer(config, apply_fn, variables, train, val, inputs, run=Path(run) if run else None,
                      devices=devices, host_augment=host_augment, phases=phases or Phases(announce=False),
                      resume_hint=resume_hint, restart_hint=restart_hint)
    own = [Progress(desc)] + ([Metrics(trainer.run)] + ([Report()] if report else []) if trainer.writer else [])
    hooks, graceful = [*own, *hooks], True
    try:
        trainer.restore(resume)
        trainer.start()
        _train(trainer, hooks)
        return trainer.result()
    except KeyboardInterrupt as interrupt:
        raise interrupted_at_once(isinstance(interrupt, Terminated), trainer.run, trainer.saved,
                                  trainer.steps_per_epoch, resume_hint) from None
    except Exception as error:
        if (lost := distributed.peer_lost(error, resume_hint)) is None:
            raise
        graceful = False
        raise lost from None
    finally:
        tell(hooks, "at_end", trainer)
        if trainer.checkpointer is not None and graceful:
            trainer.checkpointer.close()


def _train(trainer: Trainer, hooks: list) -> None:
    """Each call of training steps, then what the schedule puts after it; a stop request saves and stops."""
    with StopRequest(saves=trainer.checkpointer is not None) as stop, \
            contextlib.closing(trainer.batches) as batches:
        for call, idx in batches:
            trainer.step(call, idx)
            tell(hooks, "after_call", trainer, call)
            if call.evaluate:
                tell(hooks, "after_evaluation", trainer, trainer.evaluate(call.end))
            due = trainer.checkpoint_due(call)  # first: every process takes part in its decision
            if (due or stop.requested is not None or trainer.stopping) and trainer.save(call.end):
                tell(hooks, "after_checkpoint", trainer, call.end)
            if trainer.stopping:
                break
            if stop.requested is not None:
                raise interrupted(call.end, call.end / trainer.steps_per_epoch, trainer.run, trainer.resume_hint,
                                  stop.requested == signal.SIGTERM)
    trainer.sync()
    trainer.finished = True


def _claim(run: Path, resume: bool, continue_from: Optional[Path]) -> bool:
    """Claim and mark the run folder (a fresh one starts as `continue_from` resumed); whether to resume."""
    folder = runs.RunFolder.claim(run)
    distributed.barrier(f"claimed {run}")  # every process checked the folder before process 0 marks it
    if distributed.is_writer() and not runs.is_run(run):
        folder.create()
    distributed.barrier(f"marked {run}")
    fresh = continue_from is not None and latest_epoch(run) is None
    distributed.barrier(f"checked {run}")  # every process decides before process 0 copies anything
    if fresh and distributed.is_writer():
        continue_run(continue_from, run)
    distributed.barrier(f"continued {run}")
    return resume or fresh


def _prepared(config: Config, train: Split, val: Split) -> tuple:
    """The validated config with its normalisation resolved from `train`, and its model."""
    train.check_images("the training images"), val.check_images("the validation images")
    config = with_normalization(config.validate(), train.images)
    return config, build_model(config)


def _fit_on_images(config: Config, model, variables: dict, train: Split, val: Split, desc: str, **options):
    """`fit` of a network that runs on the images, augmented on the device or by albumentations on the host."""
    spec, on_host = AugmentSpec.from_config(config), config.augment_backend == "albumentations"
    return fit(config, Apply(model), variables, train, val, HostAugmentedInputs(spec) if on_host else ImageInputs(spec),
               desc=desc, host_augment=HostAugment(seed=config.seed) if on_host else None, **options)


def train_loop(config: Config, train: Split, val: Split, variables: Optional[dict] = None, **options) -> FitResult:
    """The original's train_loop: train the configured model (SimpleCNN by default) from scratch; `options`: `fit`'s
    (run, resume, devices, phases, resume_hint, restart_hint, hooks, report)."""
    config, model = _prepared(config, train, val)
    variables = variables if variables is not None else init_variables(model, config)
    return _fit_on_images(config, model, variables, train, val, "train", **options)


def fine_tune_loop(config: Config, variables: dict, train: Split, val: Split, *, features=None, **options) -> FitResult:
    """The original's fine_tune_loop: train a ResNet-18's unfrozen part (default: the head), on cached backbone
    features where the backbone is fixed (`inputs.cacheable`; `features` shares them between runs)."""
    config, model = _prepared(config, train, val)
    if not cacheable(config):
        return _fit_on_images(config, model, variables, train, val, "fine-tune", **options)
    if features is None:
        with (options.get("phases") or Phases(announce=False))("feature_extraction", "extracting backbone features"):
            features = backbone_features(config, model, variables, train, val, options.get("devices"))
    return fit(config, Apply(model, "classify"), variables, *features, FeatureInputs(AugmentSpec.from_config(config)),
               desc="fine-tune (cached features)", **options)
