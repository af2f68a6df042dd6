"""Scoring a model on a split: predictions (with test-time flips), accuracy per class, the confusion matrix."""
from __future__ import annotations

import numpy as np
import optax

from cifarjax.augment import AugmentSpec
from cifarjax.config import Config
from cifarjax.data import Split, check_pixels
from cifarjax.errors import UserError
from cifarjax.inputs import ImageInputs
from cifarjax.models import Apply, build_model
from cifarjax.sources import check_labels
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
