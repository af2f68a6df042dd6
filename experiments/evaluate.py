"""Score a finished run on a dataset split: accuracy, per-class accuracy, the most confused classes.

    python -m experiments.evaluate RUN_DIR [--data-dir DIR] [--split auto|test|val] [--json]

Prints a short table (or, with --json, one JSON object) and writes RUN_DIR/plots/confusion_matrix_<split>.png
(or --plot FILE; beside a file of that name that cifarjax did not write). A plot that cannot be written (a
read-only run) is one warning line; the score is printed all the same.
--split auto (the default) scores the data's test split when it has one and the validation split of the
run's own seeded 80/20 split otherwise, and says which; a folder holding only test/<class>/* is enough for
--split test. Runs that kept a moving average of their weights are scored with it (--no-average: the final
weights).
"""
from __future__ import annotations

import argparse
import json
import sys

from experiments import common
from cifarjax import plots, runs
from cifarjax.config import SOURCES, Config
from cifarjax.data import fingerprint, load_dataset, train_val_split
from cifarjax.errors import UserError, exit_on_user_error, warn
from cifarjax.flags import Parser
from cifarjax.predictor import evaluate, format_table, load_run


def choose_split(dataset, config: Config, wanted: str, data_dir):
    """(split, name) to score; 'auto' takes test when the data has it, else the run's validation split."""
    if wanted == "test" or (wanted == "auto" and dataset.test is not None):
        if dataset.test is None:
            raise UserError(f"{data_dir} has no test split (DIR/test/<class>/*); pass --split val to score the "
                            "run's validation images, or a folder with a test split")
        return dataset.test, "test"
    if dataset.train is None:
        raise UserError(f"{data_dir} has no training images to take the validation split from; pass --split test")
    return train_val_split(dataset, config.val_fraction, config.seed, config.subset)[1], "val"


@exit_on_user_error
def main(argv=None) -> None:
    p = Parser(prog="python -m experiments.evaluate", description=__doc__.splitlines()[0])
    p.add_argument("run_dir", help="the --out folder of a cnn or finetune run (one sub-run of a multi-run finetune)")
    p.add_argument("--data-dir", default=None, help="data folder (default: the run's own)")
    p.add_argument("--dataset", choices=SOURCES, default=None, help="data source (default: the run's own)")
    p.add_argument("--split", choices=("auto", "test", "val"), default="auto",
                   help="what to score (default: auto, the test split when the data has one, else validation)")
    p.add_argument("--json", action="store_true", help="print the full result as one JSON object")
    p.add_argument("--plot", default=None, metavar="FILE",
                   help="where to write the confusion matrix (default: RUN_DIR/plots/confusion_matrix_<split>.png)")
    p.add_argument("--average", action=argparse.BooleanOptionalAction, default=None,
                   help="score the moving average of the weights (default: when the run kept one)")
    p.add_argument("--tta-flip", action=argparse.BooleanOptionalAction, default=None,
                   help="average each image's and its mirror image's logits (default: as the run did)")
    args = p.parse_args(argv)
    loaded = load_run(args.run_dir, average=args.average)
    run, average = loaded.path, loaded.average
    config = loaded.config if args.tta_flip is None else loaded.config.replace(tta_flip=args.tta_flip)
    data_dir = runs.absolute(args.data_dir) if args.data_dir is not None else config.data_dir
    saved = runs.read_config(run)
    dataset = load_dataset(data_dir, args.dataset or ("auto" if args.data_dir else config.dataset), config.decode_size,
                           config.classes)
    if tuple(dataset.classes) != tuple(config.classes):
        raise UserError(f"the data's classes {list(dataset.classes)} differ from the run's {list(config.classes)}; "
                        "pass a folder with the same class folders")
    split, name = choose_split(dataset, config, args.split, data_dir)
    if args.data_dir is None or name == "val":  # the run's own data, or its seeded split of the data given
        runs.check_data(saved, fingerprint(dataset), data_dir, run, "pass the run's own data with --data-dir "
                        "(or other data's test split with --data-dir DIR --split test)")
    plot = plots.output_path(args.plot if args.plot is not None else run / runs.PLOTS / f"confusion_matrix_{name}.png")
    result = evaluate(config, loaded.variables, split)
    try:
        path = plots.plot_confusion_matrix(result["confusion_matrix"], config.classes, plot,
                                           title=f"Confusion matrix of {runs.run_name(run)} ({name} split, "
                                                 f"{len(split)} images)")
    except OSError as error:  # a read-only run: the score is worth printing without its plot
        path = None
        warn(f"the confusion matrix was not written ({error.strerror or error} on {error.filename or plot}); pass "
             "--plot FILE to write it elsewhere")
    result = {**_rounded(result), "split": name, "weights": "moving average" if average else "final",
              "epochs_trained": loaded.epochs, "started_from": loaded.started_from, "tta_flip": config.tta_flip,
              "run": str(run), "plot": path and str(path)}
    if args.json:
        print(json.dumps(result))
        return
    if args.split == "auto":
        print(f"no test split in {data_dir}: scored the run's validation split" if name == "val" else
              f"scored the test split of {data_dir}", file=sys.stderr)
    print(f"{run} ({loaded.description}), {name} split\n{format_table(result)}\nconfusion matrix: "
          f"{path or 'not written'}")


def _rounded(result: dict) -> dict:
    return {**result, "accuracy": round(result["accuracy"], 5),
            "per_class": {k: round(v, 5) for k, v in result["per_class"].items()}}


if __name__ == "__main__":
    common.launch(main)
