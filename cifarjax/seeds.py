"""One experiment over several seeds, summarised as mean ± sd: the library side of the commands' `--seeds`."""
from __future__ import annotations

import statistics
from typing import Callable, Iterable

READINGS = ("val_accuracy", "best_val_accuracy", "last5_mean_val_accuracy")


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
    return {"results": results, "mean_sd": {k: mean_sd(r[k] for r in readings) for k in READINGS}}
