"""Figures written to PNG files (headless): the original's two plots, a confusion matrix, sample predictions."""
from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import seaborn as sns  # noqa: E402


def _save(fig, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_training_results(train_loss: Sequence[float], val_accuracy: Sequence[float],
                          val_epoch: Sequence[float], path) -> Path:
    """The original's figure: training loss per epoch and validation accuracy, side by side."""
    sns.set_theme(style="whitegrid")
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    left.plot(range(1, len(train_loss) + 1), train_loss, marker="o")
    left.set(title="Training loss", xlabel="epoch", ylabel="cross-entropy (mean over epoch)")
    right.plot(val_epoch, np.asarray(val_accuracy) * 100, marker="o", color="tab:green")
    right.set(title="Validation accuracy", xlabel="epoch", ylabel="accuracy (%)")
    return _save(fig, path)


def plot_fine_tuning_results(val_curves: Mapping[str, Sequence[float]], path, title="Fine-tuning: validation accuracy"
                             ) -> Path:
    """The original's figure: validation accuracy per epoch, one curve per run (e.g. 20, 50, 100 epochs)."""
    sns.set_theme(style="whitegrid")
    fig, ax = plt.subplots(figsize=(8, 5))
    for label, curve in val_curves.items():
        ax.plot(range(1, len(curve) + 1), np.asarray(curve) * 100, label=label)
    ax.set(title=title, xlabel="epoch", ylabel="validation accuracy (%)")
    ax.legend()
    return _save(fig, path)


def plot_confusion_matrix(matrix: np.ndarray, classes: Sequence[str], path, title="Confusion matrix") -> Path:
    """Heatmap of counts; rows are true classes, columns predicted ones."""
    sns.set_theme(style="white")
    fig, ax = plt.subplots(figsize=(1.0 + 0.8 * len(classes), 0.8 + 0.7 * len(classes)))
    sns.heatmap(matrix, annot=True, fmt="d", cmap="Blues", xticklabels=classes, yticklabels=classes, ax=ax,
                cbar_kws={"label": "images"})
    ax.set(title=title, xlabel="predicted class", ylabel="true class")
    return _save(fig, path)


def plot_sample_predictions(images: np.ndarray, predicted: Sequence[int], true: Sequence[int],
                            classes: Sequence[str], path, columns: int = 8) -> Path:
    """A grid of uint8 images titled 'predicted (true)', green when right and red when wrong."""
    n = len(images)
    rows = -(-n // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(1.6 * columns, 1.8 * rows), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, image, p, t in zip(axes.ravel(), images, predicted, true):
        ax.imshow(image, interpolation="nearest")
        ax.set_title(f"{classes[p]}\n({classes[t]})", fontsize=8, color="green" if p == t else "red")
    fig.suptitle("Sample predictions: predicted (true)")
    return _save(fig, path)


def confusion_matrix(true: np.ndarray, predicted: np.ndarray, n_classes: int) -> np.ndarray:
    return np.bincount(true * n_classes + predicted, minlength=n_classes * n_classes).reshape(n_classes, n_classes)
