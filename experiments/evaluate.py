"""Score a finished run on a dataset split: accuracy, per-class accuracy, confusion matrix.

    python -m experiments.evaluate RUN_DIR [--data-dir DIR] [--split test|val]

Prints one JSON line and writes RUN_DIR/plots/confusion_matrix_<split>.png. A folder holding only
test/<class>/* images is enough for --split test.
"""
from __future__ import annotations

import argparse
import json

import numpy as np

from experiments import common  # noqa: F401 - sets the environment before jax
from cifarjax import plots, runs
from cifarjax.checkpoint import find_run, load_variables
from cifarjax.config import Config
from cifarjax.data import SOURCES, load_dataset, train_val_split
from cifarjax.errors import UserError, exit_on_user_error
from cifarjax.loop import predict


@exit_on_user_error
def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m experiments.evaluate", description=__doc__.splitlines()[0])
    p.add_argument("run_dir", help="the --out folder of a cnn or finetune run (one sub-run of a multi-run finetune)")
    p.add_argument("--data-dir", default=None, help="data folder (default: the run's own)")
    p.add_argument("--dataset", choices=SOURCES, default=None, help="data source (default: the run's own)")
    p.add_argument("--split", choices=("test", "val"), default="test")
    args = p.parse_args(argv)
    run = find_run(args.run_dir)
    config = Config.from_dict(runs.read_json(run / runs.CONFIG))
    variables = load_variables(run)
    data_dir = args.data_dir if args.data_dir is not None else config.data_dir
    dataset = load_dataset(data_dir, args.dataset or ("auto" if args.data_dir else config.dataset), config.decode_size)
    if tuple(dataset.classes) != tuple(config.classes):
        raise UserError(f"the data's classes {list(dataset.classes)} differ from the run's {list(config.classes)}; "
                        "pass a folder with the same class folders")
    if args.split == "test":
        if dataset.test is None:
            raise UserError(f"{data_dir} has no test split; pass a folder with test/<class>/* images or --split val")
        split = dataset.test
    else:
        split = train_val_split(dataset, config.val_fraction, config.seed)[1]
    preds = predict(config, variables, split)
    matrix = plots.confusion_matrix(split.labels, preds, len(config.classes))
    per_class = {c: float(matrix[i, i] / max(matrix[i].sum(), 1)) for i, c in enumerate(config.classes)}
    path = plots.plot_confusion_matrix(matrix, config.classes, run / runs.PLOTS / f"confusion_matrix_{args.split}.png",
                                       title=f"Confusion matrix ({args.split} split, {len(split)} images)")
    print(json.dumps({"accuracy": float(np.mean(preds == split.labels)), "n": int(len(split)),
                      "split": args.split, "per_class": per_class, "confusion_matrix": matrix.tolist(),
                      "run": str(run), "plot": str(path)}))


if __name__ == "__main__":
    main()
