"""What a fit records: per-step metrics read in bulk (`LossTracker`), one record per evaluation (`History`), its
result (`FitResult`), and several seeds' results as mean ± sd (`over_seeds`: the commands' `--seeds`)."""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Callable, Iterable, Optional

import jax
import numpy as np


class LossTracker:
    """Per-step metrics kept on the device and read in bulk (no sync per step); checks they are finite."""

    def __init__(self, loss_sum=0.0, acc_sum=0.0, count=0, first_loss=None):
        self.loss_sum, self.acc_sum, self.count, self.first_loss = loss_sum, acc_sum, count, first_loss
        self.pending, self.recent = [], (None, 0.0, 0)  # calls' (end, metrics) to read; (last step, loss sum, steps)

    def flush(self) -> Optional[tuple]:
        """Fold the pending calls' metrics into the sums: (step, loss) of the first non-finite loss, or None."""
        pending, self.pending = self.pending, []
        for (end, _), m in zip(pending, jax.device_get([m for _, m in pending])):
            losses, accs = np.atleast_1d(m["loss"][0]), np.atleast_1d(m["accuracy"][0])
            for step, loss, acc in zip(range(end - len(losses) + 1, end + 1), losses.tolist(), accs.tolist()):
                if not math.isfinite(loss):
                    self.recent = (None, 0.0, 0)  # the run stops: its curve ends at the last finite read
                    return step, loss
                self.first_loss = loss if self.first_loss is None else self.first_loss
                self.recent = (step, self.recent[1] + loss, self.recent[2] + 1)
                self.loss_sum, self.acc_sum, self.count = self.loss_sum + loss, self.acc_sum + acc, self.count + 1
        return None

    def mean(self):
        return self.loss_sum / max(self.count, 1), self.acc_sum / max(self.count, 1)

    def take_recent(self) -> Optional[tuple]:
        """(last step, mean loss) of the steps read since the last call, or None when there were none."""
        (step, total, n), self.recent = self.recent, (None, 0.0, 0)
        return (step, total / n) if n else None

    def reset(self):
        self.loss_sum, self.acc_sum, self.count = 0.0, 0.0, 0


@dataclass
class History:
    """One dict per evaluation (metrics.jsonl's lines), and the original's per-epoch lists derived from them."""
    records: list

    def _epoch_ends(self, key):
        return [r[key] for r in self.records if r.get("epoch_end")]

    train_loss = property(lambda self: self._epoch_ends("train_loss"))
    train_accuracy = property(lambda self: self._epoch_ends("train_accuracy"))
    epoch_val_accuracy = property(lambda self: self._epoch_ends("val_accuracy"))
    val_accuracy = property(lambda self: [r["val_accuracy"] for r in self.records])
    val_epoch = property(lambda self: [r["epoch"] for r in self.records])

    def readings(self) -> dict:
        """Final, best and last-five-mean (`last_mean_epochs`: fewer when fewer ran) epoch-end validation accuracy."""
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
    this_process: Optional[dict] = None  # this fit's own figures, which add up (`phases.Chrono.this_process`)

    @property
    def eval_variables(self) -> dict:
        return self.average if self.average is not None else self.variables


def mean_sd(values: Iterable[float]) -> dict:
    """{'mean', 'sd' (the sample sd; 0 for one value), 'n'} of `values`."""
    values = [float(v) for v in values]
    return {"mean": statistics.fmean(values), "sd": statistics.stdev(values) if len(values) > 1 else 0.0,
            "n": len(values)}


def per_epoch(series: Iterable) -> tuple:
    """(mean, sd: None for one seed) per epoch of several seeds' per-epoch values, over the epochs all ran."""
    by_epoch = list(zip(*series))
    sd = [statistics.stdev(e) for e in by_epoch] if by_epoch and len(by_epoch[0]) > 1 else None
    return [statistics.fmean(e) for e in by_epoch], sd


def over_seeds(train: Callable, seeds: Iterable[int]) -> dict:
    """{'results': {seed: train(seed)}, 'mean_sd': {reading: mean_sd}} of `train` returning a `FitResult`."""
    results = {seed: train(seed) for seed in seeds}
    readings = [result.history.readings() for result in results.values()]
    keys = ("val_accuracy", "best_val_accuracy", "last5_mean_val_accuracy")
    return {"results": results, "mean_sd": {k: mean_sd(r[k] for r in readings) for k in keys}}
