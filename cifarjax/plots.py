"""Figures in PNG files (headless), in seaborn's colour-blind palette, each colour also told by line style or marker;
seaborn itself (2 s to import) only for the study's bar chart, the others in matplotlib's copy of its styles."""
from __future__ import annotations

import math
import textwrap
from pathlib import Path
from typing import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.backend_bases import FigureCanvasBase  # noqa: E402
import numpy as np  # noqa: E402

from cifarjax import runs  # noqa: E402
from cifarjax.errors import UserError, warn  # noqa: E402
from cifarjax.runs import atomic_write  # noqa: E402
from cifarjax.text import printable  # noqa: E402

PALETTE = ("#0173b2", "#de8f05", "#029e73", "#d55e00", "#cc78bc", "#ca9161", "#fbafe4", "#949494", "#ece133",
           "#56b4e9")  # seaborn.color_palette("colorblind")
STYLES = ("-", "--", "-.", ":")
MARKERS = ("o", "s", "^", "D", "v", "P", "X")
CELL_INCHES, TITLE_INCHES = 1.6, 0.36  # a sample image's width in the figure, and its title's two 8-point lines
MIN_SPAN = 10.0  # accuracy axes span at least this many points, so noise does not look like a trend


def output_path(path) -> Path:
    """The file a figure for `path` goes to ('.png' added as matplotlib adds it), refused unless matplotlib can."""
    path = Path(path)
    path = path if path.suffix else path.with_name(path.name + ".png")
    if path.suffix[1:].lower() not in FigureCanvasBase.get_supported_filetypes():
        raise UserError(f"cannot draw a figure into {path}: {path.suffix} is not an image format matplotlib "
                        f"writes; use .png, .pdf or .svg")
    if path.is_dir():
        raise UserError(f"cannot draw a figure into {path}: it is a folder; name a file")
    return path


def _save(fig, path) -> Path:
    """Write `fig` atomically, every text `printable`; beside `path` (said) where it holds a file not cifarjax's."""
    asked = output_path(path)
    path = runs.RunFolder.free_name(asked)
    if path != asked:
        warn(f"{asked} is not a file cifarjax wrote, so it is left alone; the figure goes to {path}")
    try:
        for text in fig.findobj(matplotlib.text.Text):  # names that are not UTF-8 (class or run folders): escaped
            text.set_text(printable(text.get_text()))
        fig.tight_layout()
        with atomic_write(path, "wb") as f:
            fig.savefig(f, dpi=120, format=path.suffix[1:].lower())
    finally:
        plt.close(fig)
    return path


def _figure(title: str, *grid, **options):
    """`plt.subplots` with the title in 12 points, wrapped to the figure's width (an average glyph is 0.6 em wide)."""
    fig, axes = plt.subplots(*grid, **options)
    width = max(20, int(fig.get_figwidth() * 0.95 * 72 / (0.6 * 12)))
    fig.suptitle("\n".join(textwrap.wrap(title, width)) or title, fontsize=12)
    return fig, axes


def _epoch_panel(ax, title: str, last_epoch: float, accuracies=None) -> None:
    """A panel over the epochs: cross-entropy, or a percent axis of `accuracies` at least MIN_SPAN points wide."""
    ax.set(title=title, xlim=(0, max(1.0, last_epoch) * 1.05), xlabel="epoch", ylabel="cross-entropy")
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    if accuracies is None:
        return
    values = [v for v in accuracies if v is not None]
    lo, hi = (min(values), max(values)) if values else (0.0, 100.0)
    if hi - lo < MIN_SPAN:
        lo, hi = (hi + lo - MIN_SPAN) / 2, (hi + lo + MIN_SPAN) / 2
    pad = (hi - lo) * 0.08
    lo, hi = max(0.0, lo - pad), min(100.0, hi + pad)
    ax.set(ylim=(lo, hi), ylabel="accuracy (%)" + (f" (axis from {lo:.0f}%)" if lo > 0 else ""))


@plt.style.context("seaborn-v0_8-whitegrid")
def plot_training_results(records: Sequence[dict], path, title: str = "Training", label_smoothing: float = 0.0
                          ) -> Path:
    """Training and validation loss and accuracy per epoch (a smoothed training loss is labelled not comparable)."""
    ends = [r for r in records if r.get("epoch_end")]
    fig, axes = _figure(title, 1, 2, figsize=(12, 4.5))
    x_end, x_all = [r["epoch"] for r in ends], [r["epoch"] for r in records]
    smoothed = f", label smoothing {label_smoothing:g}: not comparable" if label_smoothing else ""
    for ax, key, scale, mean in zip(axes, ("loss", "accuracy"), (1, 100), (f"epoch mean{smoothed}", "epoch mean")):
        train = [scale * r[f"train_{key}"] for r in ends]
        val = [None if r.get(f"val_{key}") is None else scale * r[f"val_{key}"] for r in records]
        ax.plot(x_end, train, marker="o", color=PALETTE[0], label=f"training ({mean})")
        ax.plot(x_all, val, marker="s", ls="--", color=PALETTE[1], label="validation")
        ax.legend()
        _epoch_panel(ax, key.capitalize(), max(x_all, default=1.0), train + val if key == "accuracy" else None)
    return _save(fig, path)


@plt.style.context("seaborn-v0_8-whitegrid")
def plot_runs(curves: Mapping[str, Mapping[str, Sequence[float]]], path, title: str) -> Path:
    """Per epoch and run (a line style, marker and colour each), `curves`' {label: {'val', 'train', 'val_loss'}}
    fractions ('train', 'val_loss' optional; 'val_sd', 'train_sd': a band of one sd around a mean); a run that
    continues a shorter one (its curves begin with the shorter's) is drawn from where that one ends."""
    panels = [(k, name) for k, name in (("val", "Validation accuracy"), ("train", "Training accuracy"),
                                         ("val_loss", "Validation loss"))
              if k == "val" or any(c.get(k) for c in curves.values())]
    fig, axes = _figure(title, 1, len(panels), figsize=(2 + 5.5 * len(panels), 5.5), squeeze=False)
    longest = max((len(c["val"]) for c in curves.values()), default=1)
    every = max(1, longest // 15)
    # (epochs, label) of the longest run whose curves each run's own begin with exactly: drawn from where it ends
    continued = {label: max(((len(o["val"]), other) for other, o in curves.items() if 0 < len(o["val"]) < len(c["val"])
                             and all(list(o.get(k) or []) == list(c.get(k) or [])[:len(o.get(k) or [])] for k in o)),
                            default=(1, None)) for label, c in curves.items()}
    for ax, (key, name) in zip(axes[0], panels):
        scale, values = 1 if key == "val_loss" else 100, []
        for i, (label, c) in enumerate(curves.items()):
            y = [None if v is None else scale * v for v in c.get(key) or []]
            values += y
            start, shorter = continued[label]
            last = next((v for v in reversed(y) if v is not None), None)
            final = "" if last is None else f"final {last:.1f}%" if scale == 100 else f"final {last:.3f}"
            shown = final if shorter is None else f"continues {shorter}; {final}"
            offset = i * every // max(1, len(curves))  # runs' markers apart; a run shorter than it is marked at 1
            sd, colour = [scale * v for v in c.get(f"{key}_sd") or []], PALETTE[i % len(PALETTE)]  # sd: over seeds
            if sd:
                ax.fill_between(range(start, len(sd) + 1), [m - d for m, d in zip(y, sd)][start - 1:],
                                [m + d for m, d in zip(y, sd)][start - 1:], color=colour, alpha=0.2)
            ax.plot(range(start, len(y) + 1), y[start - 1:], ls=STYLES[i % len(STYLES)],
                    marker=MARKERS[i % len(MARKERS)], markevery=(offset if offset <= len(y) - start else 0, every),
                    color=colour, label=f"{label} ({shown.strip('; ')})" if shown else label)
        ax.legend(fontsize=8)
        _epoch_panel(ax, name, longest, None if key == "val_loss" else values)
    return _save(fig, path)


def _heatmap(ax, values: np.ndarray, classes: Sequence[str], fmt: str, title: str, label: str, vmax=None) -> None:
    """seaborn's annotated heatmap in matplotlib alone: coloured cells, each value in black or white as reads best."""
    image = ax.imshow(values, cmap="viridis", vmin=0, vmax=vmax if vmax is not None else max(values.max(), 1))
    for (i, j), v in np.ndenumerate(values):
        r, g, b, _ = image.cmap(image.norm(v))
        ax.text(j, i, format(v, fmt), ha="center", va="center", fontsize=9,
                color="black" if 0.2126 * r + 0.7152 * g + 0.0722 * b > 0.408 else "white")
    classes = [printable(c) for c in classes]  # tick labels are drawn from these, not from Text objects
    ax.set_xticks(range(len(classes)), classes, rotation=90)
    ax.set_yticks(range(len(classes)), classes)
    ax.figure.colorbar(image, ax=ax, label=label)
    ax.set(title=title, xlabel="predicted class", ylabel="true class")


@plt.style.context("seaborn-v0_8-white")
def plot_confusion_matrix(matrix: np.ndarray, classes: Sequence[str], path, title="Confusion matrix") -> Path:
    """Counts (floats with 3 significant digits) beside the row-normalised matrix; the accuracy in the title."""
    matrix, n = np.asarray(matrix), len(classes)
    numeric = np.issubdtype(matrix.dtype, np.integer) or np.issubdtype(matrix.dtype, np.floating)
    if matrix.shape != (n, n) or not numeric or not np.all(np.isfinite(matrix)) or np.any(matrix < 0):
        raise UserError(f"plot_confusion_matrix takes a ({n}, {n}) matrix of non-negative counts for the {n} classes; "
                        f"got {matrix.dtype} {matrix.shape}" + (" with negative or non-finite values" if numeric
                                                               and matrix.shape == (n, n) else ""))
    accuracy = np.trace(matrix) / max(matrix.sum(), 1)
    cells = 0.75 * len(classes)  # inches of heatmap; then room for the class names (rotated below) and labels
    room = 1.2 + 0.09 * max((len(printable(c)) for c in classes), default=0)
    fig, (counts, rates) = _figure(f"{title}: accuracy {100 * accuracy:.2f}%", 1, 2,
                                   figsize=(2 * (cells + room) + 1.5, cells + room + 0.6))
    _heatmap(counts, matrix, classes, "d" if np.issubdtype(matrix.dtype, np.integer) else ".3g", "counts", "images")
    normalised = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
    _heatmap(rates, 100 * normalised, classes, ".0f", "row-normalised (%)", "% of the true class", vmax=100)
    return _save(fig, path)


def plot_sample_predictions(images: np.ndarray, predicted: Sequence[int], true: Sequence[int],
                            classes: Sequence[str], path, columns: int = 8,
                            title: str = "Sample predictions: predicted (true)") -> Path:
    """A grid of uint8 images titled 'predicted (true)', marked ✓ (blue) when right and ✗ (orange) when wrong; tiled
    on one axes (an axes per image took 2.8 s to draw 32, this 0.35 s)."""
    images = np.asarray(images)
    n, h, w = images.shape[:3]
    rows = -(-n // columns)
    gap_x = max(2, w // 10)  # room between images; each column is CELL_INCHES wide in the figure
    gap_y = math.ceil(TITLE_INCHES * (w + gap_x) / CELL_INCHES)  # room above each image for its two-line title
    canvas = np.full((rows * (gap_y + h), columns * (w + gap_x)) + images.shape[3:], 255, images.dtype)
    fig, ax = _figure(title, figsize=(CELL_INCHES * columns,
                                      CELL_INCHES * columns * canvas.shape[0] / canvas.shape[1] + 0.5))
    for k, (image, p, t) in enumerate(zip(images, predicted, true)):
        top, left = (k // columns) * (gap_y + h) + gap_y, (k % columns) * (w + gap_x) + gap_x // 2
        canvas[top:top + h, left:left + w] = image
        right = p == t
        ax.text(left + w / 2, top - 1, f"{'✓' if right else '✗'} {classes[p]}\n({classes[t]})", ha="center",
                va="bottom", fontsize=8, color=PALETTE[0] if right else PALETTE[1])
    ax.imshow(canvas, interpolation="nearest", cmap="gray" if canvas.ndim == 2 else None)
    ax.axis("off")
    return _save(fig, path)


def plot_split(run: Path, name: str, split, predicted: np.ndarray, matrix, classes: Sequence[str]) -> None:
    """A run's confusion matrix and 32 sample predictions (of images, not cached features) on its `name` split."""
    of = f"of {runs.run_name(run)} ({name} split"
    plot_confusion_matrix(np.asarray(matrix), classes, run / runs.PLOTS / "confusion_matrix.png",
                          title=f"Confusion matrix {of}, {len(split)} images)")
    if split.images.dtype == np.uint8:
        pick = np.random.default_rng(0).choice(len(split), min(32, len(split)), replace=False)
        plot_sample_predictions(split.images[pick], predicted[pick], split.labels[pick], classes,
                                run / runs.PLOTS / "sample_predictions.png",
                                title=f"Sample predictions {of}): predicted (true)")


@plt.style.context("seaborn-v0_8-whitegrid")
def plot_study_effects(answer: Mapping, path, title: str) -> Path:
    """The answer's cells' change against the baseline (coloured by verdict), twice the noise, the SimpleCNN line."""
    import seaborn as sns  # only here (see the module's docstring)

    cells = sorted((c for c in answer["cells"] if c.get("model") != "simple_cnn"), key=lambda c: -c["effect_points"])
    reference = next((c["val_accuracy"] for c in answer["cells"] if c.get("model") == "simple_cnn"), None)
    baseline, noise = next(c for c in cells if c["name"] == "baseline")["val_accuracy"], answer["noise_points"]
    fig, ax = _figure(title, figsize=(9, 0.55 * len(cells) + 2))
    colours = [{"supported": PALETTE[2], "refuted": PALETTE[3]}.get(c.get("verdict"), PALETTE[7]) for c in cells]
    sns.barplot(x=[c["effect_points"] for c in cells], y=[c["name"] for c in cells], hue=[c["name"] for c in cells],
                palette=colours, legend=False, ax=ax, orient="h")
    ax.axvspan(-2 * noise, 2 * noise, facecolor="0.85", edgecolor="0.45", zorder=0,
               label=f"within noise: twice the noise of ±{noise:.2f} (±{2 * noise:.2f} points)")
    if reference is not None:
        ax.axvline(100 * (reference - baseline), color=PALETTE[0], ls="--", lw=2,
                   label=f"SimpleCNN reference ({100 * reference:.1f}%)")
    for y, c in enumerate(cells):
        ax.text(c["effect_points"], y, f" {100 * c['val_accuracy']:.1f}%", va="center", fontsize=8)
    ax.set(xlabel=f"change in validation accuracy against the baseline ({100 * baseline:.1f}%), points", ylabel="cell")
    ax.legend(loc="lower right", fontsize=8)
    return _save(fig, path)
