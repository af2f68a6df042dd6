"""Figures written to PNG files (headless): training curves, fine-tuning runs, confusion matrices, sample
predictions and comparisons of runs. Colours come from seaborn's colour-blind palette, and every distinction
drawn in colour is also drawn in line style or marker."""
from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import seaborn as sns  # noqa: E402

PALETTE = sns.color_palette("colorblind")
STYLES = ("-", "--", "-.", ":")
MARKERS = ("o", "s", "^", "D", "v", "P", "X")
MIN_SPAN = 10.0  # accuracy axes span at least this many points, so noise does not look like a trend


def _save(fig, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _epochs_axis(ax, last_epoch: float) -> None:
    ax.set_xlim(0, max(1.0, last_epoch) * 1.05)
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set_xlabel("epoch")


def _accuracy_axis(ax, values: Sequence[float], label: str) -> None:
    """Percent axis from the data, widened to at least MIN_SPAN points, saying when it does not start at 0."""
    values = [v for v in values if v is not None]
    lo, hi = (min(values), max(values)) if values else (0.0, 100.0)
    if hi - lo < MIN_SPAN:
        centre = (hi + lo) / 2
        lo, hi = centre - MIN_SPAN / 2, centre + MIN_SPAN / 2
    pad = (hi - lo) * 0.08
    lo, hi = max(0.0, lo - pad), min(100.0, hi + pad)
    ax.set_ylim(lo, hi)
    ax.set_ylabel(label + (f" (axis from {lo:.0f}%)" if lo > 0 else ""))


def plot_training_results(records: Sequence[dict], path, title: str = "Training") -> Path:
    """Loss (training and validation) and accuracy (training and validation) against epochs."""
    sns.set_theme(style="whitegrid")
    ends = [r for r in records if r.get("epoch_end")]
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    x_end, x_all = [r["epoch"] for r in ends], [r["epoch"] for r in records]
    left.plot(x_end, [r["train_loss"] for r in ends], marker="o", color=PALETTE[0], label="training (epoch mean)")
    left.plot(x_all, [r.get("val_loss") for r in records], marker="s", ls="--", color=PALETTE[1], label="validation")
    left.set(title="Loss", ylabel="cross-entropy")
    right.plot(x_end, [100 * r["train_accuracy"] for r in ends], marker="o", color=PALETTE[0],
               label="training (epoch mean)")
    right.plot(x_all, [100 * r["val_accuracy"] for r in records], marker="s", ls="--", color=PALETTE[1],
               label="validation")
    right.set(title="Accuracy")
    _accuracy_axis(right, [100 * r["train_accuracy"] for r in ends] + [100 * r["val_accuracy"] for r in records],
                   "accuracy (%)")
    for ax in (left, right):
        _epochs_axis(ax, max(x_all, default=1.0))
        ax.legend()
    fig.suptitle(title)
    return _save(fig, path)


def plot_runs(curves: Mapping[str, Mapping[str, Sequence[float]]], path, title: str) -> Path:
    """Validation and training accuracy per epoch, one line style, marker and colour per run.

    `curves`: {run label: {'val': [...], 'train': [...]}} (fractions, one value per epoch; 'train' optional).
    """
    sns.set_theme(style="whitegrid")
    has_train = any(c.get("train") for c in curves.values())
    fig, axes = plt.subplots(1, 2 if has_train else 1, figsize=(13 if has_train else 8, 5), squeeze=False)
    longest = max((len(c["val"]) for c in curves.values()), default=1)
    every = max(1, longest // 15)
    for ax, key, name in zip(axes[0], ("val", "train"), ("Validation accuracy", "Training accuracy")):
        values = []
        for i, (label, c) in enumerate(curves.items()):
            y = [100 * v for v in c.get(key) or []]
            values += y
            ax.plot(range(1, len(y) + 1), y, ls=STYLES[i % len(STYLES)], marker=MARKERS[i % len(MARKERS)],
                    markevery=every, color=PALETTE[i % len(PALETTE)], label=f"{label} (final {y[-1]:.1f}%)" if y else label)
        ax.set_title(name)
        _epochs_axis(ax, longest)
        _accuracy_axis(ax, values, "accuracy (%)")
        ax.legend(fontsize=8)
    fig.suptitle(title)
    return _save(fig, path)


def plot_confusion_matrix(matrix: np.ndarray, classes: Sequence[str], path, title="Confusion matrix") -> Path:
    """Counts beside the row-normalised matrix (recall per true class); the overall accuracy in the title."""
    sns.set_theme(style="white")
    matrix = np.asarray(matrix)
    accuracy = np.trace(matrix) / max(matrix.sum(), 1)
    size = 1.0 + 0.75 * len(classes)
    fig, (counts, rates) = plt.subplots(1, 2, figsize=(2 * size + 1, size))
    sns.heatmap(matrix, annot=True, fmt="d", cmap="viridis", xticklabels=classes, yticklabels=classes, ax=counts,
                cbar_kws={"label": "images"})
    counts.set(title="counts", xlabel="predicted class", ylabel="true class")
    normalised = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
    sns.heatmap(100 * normalised, annot=True, fmt=".0f", cmap="viridis", vmin=0, vmax=100, xticklabels=classes,
                yticklabels=classes, ax=rates, cbar_kws={"label": "% of the true class"})
    rates.set(title="row-normalised (%)", xlabel="predicted class", ylabel="true class")
    fig.suptitle(f"{title}: accuracy {100 * accuracy:.2f}%")
    return _save(fig, path)


def plot_sample_predictions(images: np.ndarray, predicted: Sequence[int], true: Sequence[int],
                            classes: Sequence[str], path, columns: int = 8) -> Path:
    """A grid of uint8 images titled 'predicted (true)', marked ✓ (blue) when right and ✗ (orange) when wrong."""
    n = len(images)
    rows = -(-n // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(1.6 * columns, 1.8 * rows), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, image, p, t in zip(axes.ravel(), images, predicted, true):
        ax.imshow(image, interpolation="nearest")
        right = p == t
        ax.set_title(f"{'✓' if right else '✗'} {classes[p]}\n({classes[t]})", fontsize=8,
                     color=PALETTE[0] if right else PALETTE[1])
    fig.suptitle("Sample predictions: predicted (true)")
    return _save(fig, path)


def plot_study_effects(cells: Sequence[dict], noise: float, reference: float, baseline: float, path, title: str) -> Path:
    """Each cell's change in validation accuracy against the baseline (points), the noise band (twice the noise),
    and the SimpleCNN reference as a line."""
    sns.set_theme(style="whitegrid")
    cells = sorted(cells, key=lambda c: -c["effect_points"])
    fig, ax = plt.subplots(figsize=(9, 0.55 * len(cells) + 2))
    colours = [PALETTE[2] if c["effect_points"] > 2 * noise else PALETTE[3] if c["effect_points"] < -2 * noise
               else PALETTE[7] for c in cells]
    sns.barplot(x=[c["effect_points"] for c in cells], y=[c["name"] for c in cells], hue=[c["name"] for c in cells],
                palette=colours, legend=False, ax=ax, orient="h")
    ax.axvspan(-2 * noise, 2 * noise, color="0.85", zorder=0, label=f"within noise (±{2 * noise:.1f} points)")
    if reference is not None:
        ax.axvline(100 * (reference - baseline), color=PALETTE[0], ls="--", lw=2,
                   label=f"SimpleCNN reference ({100 * reference:.1f}%)")
    for y, c in enumerate(cells):
        ax.text(c["effect_points"], y, f" {100 * c['val_accuracy']:.1f}%", va="center", fontsize=8)
    ax.set(xlabel=f"change in validation accuracy against the baseline ({100 * baseline:.1f}%), points", ylabel="cell",
           title=title)
    ax.legend(loc="lower right", fontsize=8)
    return _save(fig, path)
