"""Training loops with the original's semantics: `train_loop` (SimpleCNN) and `fine_tune_loop` (ResNet-18).

Both run `fit`: epochs over a seeded permutation, evaluation every `eval_every` steps and at each epoch
end, checkpoints at epoch ends (and every `checkpoint_every` steps), resumption from the latest
checkpoint, and a guard that stops on a non-finite loss. Same seed, same machine: the same numbers.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Optional

import jax
import numpy as np
from tqdm import tqdm

from cifarjax import runs
from cifarjax.augment import AugmentSpec, HostAugment
from cifarjax.batching import train_indices
from cifarjax.checkpoint import Checkpointer
from cifarjax.config import Config
from cifarjax.data import Split
from cifarjax.errors import UserError
from cifarjax.features import FeatureInputs, cacheable, extract_features
from cifarjax.models import ResNet18, SimpleCNN
from cifarjax.optim import freeze_labels, make_optimizer
from cifarjax.train import AXIS, DataParallel, ImageInputs, create_train_state


class NonFiniteLossError(UserError):
    """The training loss became NaN or infinite."""


@dataclass
class History:
    """What a run records. The original's return values: `train_loop` → (train_loss, val_accuracy,
    val_epoch); `fine_tune_loop` → (train_accuracy, epoch_val_accuracy)."""
    train_loss: list = field(default_factory=list)  # per epoch
    train_accuracy: list = field(default_factory=list)  # per epoch
    epoch_val_accuracy: list = field(default_factory=list)  # at each epoch end
    val_accuracy: list = field(default_factory=list)  # at every evaluation
    val_epoch: list = field(default_factory=list)  # position of each evaluation, in epochs
    records: list = field(default_factory=list)  # one dict per evaluation (metrics.jsonl)


@dataclass
class FitResult:
    history: History
    variables: dict  # final {'params', 'batch_stats'} on the host
    seconds: float  # training wall time (this process and any resumed ones)
    images_per_second: float


def build_model(config: Config):
    """The configured model; ResNet-18's BatchNorm is synchronised over the training devices."""
    if config.model == "simple_cnn":
        return SimpleCNN(config.num_classes, conv_impl=config.conv_impl)
    return ResNet18(config.num_classes, frozen_bn_stages=config.frozen_bn_stages, axis_name=AXIS,
                    conv_impl=config.conv_impl)


def init_variables(model, config: Config) -> dict:
    x = np.zeros((1, config.img_size, config.img_size, 3), np.float32)
    return jax.device_get(model.init(jax.random.PRNGKey(config.seed), x, train=False))


class _Progress:
    """Per-step losses kept on the device and read in bulk (no sync per step); checks they are finite."""

    def __init__(self):
        self.pending, self.loss_sum, self.acc_sum, self.count = [], 0.0, 0.0, 0

    def add(self, step: int, metrics) -> None:
        self.pending.append((step, metrics))

    def flush(self, checkpoint_dir: Optional[Path]) -> None:
        fetched = jax.device_get([m for _, m in self.pending])
        for (step, _), m in zip(self.pending, fetched):
            loss = float(m["loss"][0])
            if not math.isfinite(loss):
                where = f"the last good checkpoint is kept in {checkpoint_dir}" if checkpoint_dir else "no checkpoint"
                raise NonFiniteLossError(f"training loss became {loss} at step {step}; stopped ({where}); "
                                         "lower the learning rate (--lr) and resume or start again")
            self.loss_sum += loss
            self.acc_sum += float(m["accuracy"][0])
            self.count += 1
        self.pending = []

    def mean(self):
        return self.loss_sum / max(self.count, 1), self.acc_sum / max(self.count, 1)

    def reset(self):
        self.loss_sum, self.acc_sum, self.count = 0.0, 0.0, 0


def fit(config: Config, apply_fn, variables: dict, train: Split, val: Split, inputs, *, run: Optional[Path] = None,
        resume: bool = False, devices=None, desc: str = "train", host_augment: Optional[HostAugment] = None
        ) -> FitResult:
    """Train `variables` under `apply_fn` on `train` (images or features), evaluating on `val`.

    With `run`, metrics go to run/metrics.jsonl and checkpoints to run/checkpoints; with `resume`, training
    continues from the latest checkpoint and ends exactly where an uninterrupted run would.
    """
    run = Path(run) if run is not None else None
    labels = freeze_labels(variables["params"], config.unfreeze)
    tx = make_optimizer(variables["params"], config.lr, config.unfreeze)
    state = create_train_state(apply_fn, variables, tx, config.seed)
    parallel = DataParallel(inputs, labels if config.unfreeze != "all" else None, devices)
    n, steps_per_epoch = len(train), len(train) // config.batch_size
    train_indices(n, config.batch_size, parallel.n_devices, config.seed, 0)  # validates batch vs data/devices
    history, progress, elapsed = History(), _Progress(), 0.0
    checkpointer = Checkpointer(run, config.keep_checkpoints) if run is not None else None
    try:
        if checkpointer is not None and resume and checkpointer.latest_step() is not None:
            state, meta = checkpointer.restore(state)
            history = History(**meta["history"])
            progress.loss_sum, progress.acc_sum, progress.count = meta["loss_sum"], meta["acc_sum"], meta["count"]
            elapsed = meta["seconds"]
        if run is not None:
            runs.write_metrics(run, history.records)
        start = int(state.step)
        rstate = parallel.replicate(state)
        train_data = None if host_augment else parallel.replicate((train.images, train.labels))
        val_data = parallel.replicate((val.images, val.labels))
        t0 = time.perf_counter() - elapsed

        def evaluate(step):
            preds = parallel.predict(rstate, val_data, len(val), config.eval_batch_size)
            return float(np.mean(preds == val.labels))

        def save(step):
            if checkpointer is None:
                return
            meta = {"history": history.__dict__, "loss_sum": progress.loss_sum, "acc_sum": progress.acc_sum,
                    "count": progress.count, "seconds": time.perf_counter() - t0, "step": step,
                    "epoch": step / steps_per_epoch, "config": config.to_dict(), "split_seed": config.seed}
            checkpointer.save(parallel.unreplicate(rstate), meta)

        total = config.n_epochs * steps_per_epoch
        bar = tqdm(total=total, initial=start, desc=desc, unit="step", mininterval=1.0, dynamic_ncols=True)
        step = start
        for epoch in range(start // steps_per_epoch, config.n_epochs):
            epoch_idx = train_indices(n, config.batch_size, parallel.n_devices, config.seed, epoch)
            for idx in epoch_idx[step - epoch * steps_per_epoch:]:
                if host_augment is not None:
                    batch = (host_augment(train.images[idx], step), train.labels[idx])
                    local = np.broadcast_to(np.arange(idx.shape[1], dtype=np.int32), idx.shape)
                    rstate, metrics = parallel.train_step(rstate, batch, local)
                else:
                    rstate, metrics = parallel.train_step(rstate, train_data, idx)
                step += 1
                progress.add(step, metrics)
                epoch_end = step % steps_per_epoch == 0
                if len(progress.pending) >= 25 or epoch_end or (config.eval_every and step % config.eval_every == 0) or (
                        config.checkpoint_every and step % config.checkpoint_every == 0):
                    progress.flush(checkpointer.directory if checkpointer else None)
                    loss, acc = progress.mean()
                    bar.set_postfix(epoch=epoch + 1, loss=f"{loss:.4f}", acc=f"{acc:.3f}", refresh=False)
                bar.update(1)
                if (config.eval_every and step % config.eval_every == 0) or epoch_end:
                    val_acc = evaluate(step)
                    loss, acc = progress.mean()
                    record = {"step": step, "epoch": round(step / steps_per_epoch, 4), "train_loss": loss,
                              "train_accuracy": acc, "val_accuracy": val_acc,
                              "wall_seconds": round(time.perf_counter() - t0, 3)}
                    history.records.append(record)
                    history.val_accuracy.append(val_acc)
                    history.val_epoch.append(record["epoch"])
                    if run is not None:
                        runs.append_metrics(run, record)
                    bar.set_postfix(epoch=epoch + 1, loss=f"{loss:.4f}", acc=f"{acc:.3f}", val=f"{val_acc:.3f}")
                if epoch_end:
                    loss, acc = progress.mean()
                    history.train_loss.append(loss)
                    history.train_accuracy.append(acc)
                    history.epoch_val_accuracy.append(history.val_accuracy[-1])
                    progress.reset()
                    save(step)
                elif config.checkpoint_every and step % config.checkpoint_every == 0:
                    save(step)
        bar.close()
        seconds = time.perf_counter() - t0
        final = parallel.unreplicate(rstate)
    finally:
        if checkpointer is not None:
            checkpointer.close()
    return FitResult(history, {"params": final.params, "batch_stats": final.batch_stats}, seconds,
                     total * config.batch_size / seconds if seconds > 0 else 0.0)


def resolve_normalization(config: Config, train: Split) -> Config:
    """Fill config.norm_mean/std from config.normalize (the 'dataset' stats come from `train`)."""
    from cifarjax.augment import normalization_stats
    if config.norm_mean is None and config.normalize != "none":
        config.norm_mean, config.norm_std = normalization_stats(config.normalize, train.images)
    return config


def _host_augment(config: Config):
    if config.augment_backend != "albumentations":
        return None
    return HostAugment(img_size=config.img_size, seed=config.seed)


def _image_inputs(config: Config):
    spec = AugmentSpec.from_config(config)
    if config.augment_backend == "albumentations":  # the host already flipped and resized
        spec = AugmentSpec(config.img_size, False, 0, config.norm_mean, config.norm_std)
    return ImageInputs(spec)


def train_loop(config: Config, train: Split, val: Split, variables: Optional[dict] = None, *,
               run: Optional[Path] = None, resume: bool = False, devices=None) -> FitResult:
    """The original's train_loop: train the configured model (SimpleCNN by default) from scratch."""
    config = resolve_normalization(config.validate(), train)
    model = build_model(config)
    variables = variables if variables is not None else init_variables(model, config)
    return fit(config, model.apply, variables, train, val, _image_inputs(config), run=run, resume=resume,
               devices=devices, desc="train", host_augment=_host_augment(config))


def predict(config: Config, variables: dict, split: Split, devices=None) -> np.ndarray:
    """Predicted classes for every image of `split` (evaluation view, no augmentation)."""
    import optax
    model = build_model(config)
    parallel = DataParallel(ImageInputs(AugmentSpec.from_config(config)), devices=devices)
    state = parallel.replicate(create_train_state(model.apply, variables, optax.identity(), config.seed))
    return parallel.predict(state, parallel.replicate((split.images, split.labels)), len(split),
                            config.eval_batch_size)


def backbone_features(config: Config, variables: dict, train: Split, val: Split, devices=None):
    """Cached features for `fine_tune_loop`: (train Split of (N, 2, 512) features, val Split of (N, 512))."""
    model = build_model(config)
    spec = AugmentSpec.from_config(config)
    kw = dict(batch_size=config.eval_batch_size, devices=devices)
    train_f = extract_features(model, variables, train.images, spec, views=2, desc="train features", **kw)
    val_f = extract_features(model, variables, val.images, spec, views=1, desc="val features", **kw)[:, 0]
    return Split(train_f, train.labels), Split(val_f, val.labels)


def fine_tune_loop(config: Config, variables: dict, train: Split, val: Split, *, run: Optional[Path] = None,
                   resume: bool = False, devices=None, features=None) -> FitResult:
    """The original's fine_tune_loop: train a ResNet-18's unfrozen part (default: the head).

    When everything but the head is frozen (`features.cacheable`), the head trains on cached backbone
    features (pass `features` from `backbone_features` to share them between runs); otherwise every step
    runs the network on the images.
    """
    config = resolve_normalization(config.validate(), train)
    model = build_model(config)
    if cacheable(config):
        train_f, val_f = features if features is not None else backbone_features(config, variables, train, val, devices)
        inputs = FeatureInputs(AugmentSpec.from_config(config))
        return fit(config, partial(model.apply, method="classify"), variables, train_f, val_f, inputs, run=run,
                   resume=resume, devices=devices, desc="fine-tune (cached features)")
    return fit(config, model.apply, variables, train, val, _image_inputs(config), run=run, resume=resume,
               devices=devices, desc="fine-tune", host_augment=_host_augment(config))
