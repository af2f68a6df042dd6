"""Scoring a model on a split (predictions with test-time flips, accuracy per class, the confusion matrix), and a
finished run loaded to classify new images exactly as its evaluation did::

    run = cifarjax.load_run("runs/cnn-20261204-101500")
    print(run.top(run.predict_files(["my_cat.jpg"])["my_cat.jpg"]))  # [('cat', 0.91), ('dog', 0.06), ...]
"""
from __future__ import annotations

import numbers
import os
from pathlib import Path
from typing import Iterable, Optional

import numpy as np
import optax

from cifarjax import runs
from cifarjax.augment import AugmentSpec
from cifarjax.checkpoint import find_run, latest_epoch, load_variables
from cifarjax.config import Config
from cifarjax.data import Split, check_pixels
from cifarjax.errors import UserError, warn
from cifarjax.inputs import ImageInputs
from cifarjax.models import Apply, build_model
from cifarjax.sources import IMAGE_EXTENSIONS, check_labels, decode_files
from cifarjax.train import DataParallel, StepOptions, create_train_state


def evaluator(config: Config, variables: dict, devices=None):
    """(DataParallel, its replicated state) evaluating `variables` in `config`'s model and evaluation view."""
    parallel = DataParallel(ImageInputs(AugmentSpec.from_config(config)), devices=devices,
                            options=StepOptions(tta_flip=config.tta_flip))
    state = parallel.replicate(create_train_state(Apply(build_model(config)), variables, optax.identity(), config.seed))
    return parallel, state


def predict(config: Config, variables: dict, split: Split, devices=None) -> np.ndarray:
    """Predicted classes for every image of `split` (evaluation view, no augmentation)."""
    split.check_images("the images to predict")
    parallel, state = evaluator(config, variables, devices)
    return parallel.evaluate(state, parallel.replicate((split.images, split.labels)), len(split),
                             config.eval_batch_size)[0]


def probabilities(config: Config, variables: dict, images: np.ndarray, devices=None) -> np.ndarray:
    """(N, classes) float32 class probabilities of (N, H, W, 3) uint8 images (or floats in [0, 1])."""
    check_pixels(images, "probabilities' images")
    parallel, state = evaluator(config, variables, devices)
    return parallel.probabilities(state, parallel.replicate(images), len(images), config.eval_batch_size)


def evaluate(config: Config, variables: dict, split: Split, devices=None) -> dict:
    """`score` of `predict` on `split`: accuracy, per-class accuracy, the confusion matrix, the most confused."""
    return score(split.labels, predict(config, variables, split, devices), config.classes)


def score(true: np.ndarray, predicted: np.ndarray, classes, top: int = 5) -> dict:
    """Accuracy, per-class accuracy, the confusion matrix and the `top` most confused (true, predicted) pairs."""
    true, predicted = np.asarray(true), np.asarray(predicted)
    if true.shape != predicted.shape or true.ndim != 1:
        raise UserError(f"score needs as many predictions as labels, each a 1-D array: got labels {true.shape} and "
                        f"predictions {predicted.shape}")
    for values, what in ((true, "labels"), (predicted, "predictions")):
        if not np.issubdtype(values.dtype, np.integer):
            raise UserError(f"score's {what} must be integer class indices; got {values.dtype}")
        check_labels(values, len(classes), f"score's {what}")
    k = len(classes)
    matrix = np.bincount(true * k + predicted, minlength=k * k).reshape(k, k)  # rows: true classes; columns: predicted
    per_class = {c: float(matrix[i, i] / max(matrix[i].sum(), 1)) for i, c in enumerate(classes)}
    off = [(int(matrix[i, j]), classes[i], classes[j]) for i in range(k) for j in range(k) if i != j and matrix[i, j]]
    confused = [{"true": t, "predicted": p, "count": n} for n, t, p in sorted(off, key=lambda x: -x[0])[:top]]
    return {"accuracy": float(np.mean(true == predicted)) if len(true) else 0.0, "n": int(len(true)),
            "per_class": per_class, "most_confused": confused, "confusion_matrix": matrix.tolist()}


def format_table(result: dict) -> str:
    """A short human-readable report of `score`'s result."""
    lines = [f"accuracy {100 * result['accuracy']:.2f}% on {result['n']} images", "", "per class:"]
    width = max(len(c) for c in result["per_class"])
    lines += [f"  {c:<{width}}  {100 * a:6.2f}%" for c, a in result["per_class"].items()]
    if result["most_confused"]:
        lines += ["", "most confused (true → predicted):"]
        lines += [f"  {p['true']} → {p['predicted']}: {p['count']}" for p in result["most_confused"]]
    return "\n".join(lines)


class Run:
    """A finished run: its folder, resolved `config`, the `variables` it evaluates with, and predictors."""

    def __init__(self, path: Path, config: Config, variables: dict, average: bool, epochs: Optional[float] = None,
                 started_from: Optional[str] = None):
        self.path, self.config, self.variables, self.average = path, config, variables, average
        self.epochs, self.started_from = epochs, started_from  # epochs trained; a ResNet's starting weights
        self._evaluator = None

    @property
    def classes(self) -> tuple:
        """Class names, in the order of the probabilities' columns."""
        return tuple(self.config.classes) or tuple(str(i) for i in range(self.config.num_classes))

    @property
    def weights(self) -> str:  # which weights predict
        return "moving average" if self.average else "final"

    @property
    def description(self) -> str:
        """E.g. 'final weights, 3 of 20 epochs (unfinished), random initialisation, no pretraining'."""
        parts = [f"{self.weights} weights"]
        if self.epochs is not None and self.epochs < self.config.n_epochs:
            parts.append(f"{self.epochs:g} of {self.config.n_epochs} epochs (unfinished)")
        return ", ".join(parts + ([self.started_from] if self.started_from else []))

    def records(self) -> list:  # metrics.jsonl: one dict per evaluation during training
        return runs.read_metrics(self.path)

    def predict(self, images: np.ndarray) -> np.ndarray:
        """(N, classes) float32 probabilities of (N, H, W, 3) uint8 RGB images of any size, as the run evaluates."""
        images = np.asarray(images)
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
            raise UserError(f"predict takes (N, H, W, 3) uint8 RGB images, got a {images.dtype} array of shape "
                            f"{images.shape}; use predict_files for image files")
        if not len(images):
            return np.zeros((0, len(self.classes)), np.float32)
        self._evaluator = self._evaluator or evaluator(self.config, self.variables)
        parallel, state = self._evaluator
        return parallel.probabilities(state, parallel.replicate(images), len(images), self.config.eval_batch_size)

    def predict_files(self, paths: Iterable, skip_unreadable: bool = False) -> dict:
        """{path: class probabilities} of image files, decoded as the data loader decodes them; an unreadable file
        raises UserError, or with `skip_unreadable` is left out with a warning."""
        paths = [str(p) for p in paths]
        images, readable = decode_files(paths, self.config.decode_size, skip_unreadable=skip_unreadable)
        return dict(zip(readable, self.predict(images)))

    def evaluate(self, split: Split) -> dict:
        """Accuracy, per-class accuracy, confusion matrix and most confused pairs on a labelled `split`."""
        if not isinstance(split, Split):
            raise UserError(f"evaluate takes a labelled Split (a dataset's .test, or the validation Split of "
                            f"train_val_split), got {type(split).__name__}"
                            + ("; this dataset has no test split" if split is None else ""))
        return evaluate(self.config, self.variables, split)

    def top(self, probabilities: np.ndarray, k: int = 3) -> list:
        """The `k` most probable (class, probability) pairs of one image's probabilities, most probable first."""
        probabilities = np.asarray(probabilities)
        if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 1:
            raise UserError(f"top's k is how many classes to list: a positive integer, got {k!r}")
        if probabilities.shape != (len(self.classes),):
            raise UserError(f"top takes one image's {len(self.classes)} class probabilities (a row of predict's "
                            f"result), got shape {probabilities.shape}")
        order = np.argsort(-probabilities, kind="stable")[:k]
        return [(self.classes[i], float(probabilities[i])) for i in order]

    def __repr__(self) -> str:
        return f"Run({str(self.path)!r}, {self.config.model}, {len(self.classes)} classes, {self.description})"


def load_run(path, average: Optional[bool] = None) -> Run:
    """A run folder with its newest intact checkpoint's weights (`average`: their moving average, default if kept)."""
    folder = find_run(Path(path).expanduser())
    saved = runs.read_config(folder)
    config = Config.from_dict(saved, str(folder / runs.CONFIG))
    average = config.ema_decay > 0 if average is None else average
    return Run(folder, config, load_variables(folder, average=average), average, latest_epoch(folder),
               saved.get("weights_label"))


def image_files(paths: Iterable, report=warn) -> list:
    """Files given and the image files below folders given (sorted, not hidden); `report` hears of missing or empty."""
    found = []
    for path in map(Path, paths):
        if path.is_dir():
            below = []
            for folder, subfolders, names in os.walk(path):
                subfolders[:] = sorted(d for d in subfolders if not d.startswith("."))
                below += [Path(folder) / n for n in sorted(names)
                          if not n.startswith(".") and n.lower().endswith(IMAGE_EXTENSIONS)]
            if not below:
                report(f"{path} holds no image files ({', '.join(IMAGE_EXTENSIONS)})")
            found += below
        elif path.exists():
            found.append(path)
        else:
            report(f"{path} does not exist; it is skipped")
    return found
