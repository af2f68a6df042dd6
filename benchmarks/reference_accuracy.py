"""The PyTorch original's SimpleCNN accuracy on the same split cifarjax trains on, for an accuracy verdict.

    python -m benchmarks.reference_accuracy [--data-dir DIR] [--epochs 20] [--seed 0]

Trains the original's recipe (albumentations per image, DataLoader with 4 workers, Adam 1e-3, batch 64) on
cifarjax's seeded 80/20 split of the training images and prints one JSON line per epoch
({"epoch", "val_accuracy", "seconds"}). Compare with `python -m experiments.cnn --seed S` at the same seed: same
split, different (framework) random streams for initialisation, shuffling, flips and dropout.
"""
from __future__ import annotations

import argparse
import json
import os

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

from benchmarks import torch_reference as ref  # noqa: E402
from benchmarks.data import find_data  # noqa: E402
from cifarjax.data import load_dataset, train_val_split  # noqa: E402
from cifarjax.errors import exit_on_user_error  # noqa: E402


@exit_on_user_error
def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.reference_accuracy", description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", default=None, help="an ImageFolder or cifar-10-batches-py folder")
    p.add_argument("--epochs", type=int, default=20, help="epochs to train (default 20, the original's)")
    p.add_argument("--seed", type=int, default=0, help="seeds the split (as cifarjax's --seed) and torch")
    p.add_argument("--workers", type=int, default=4, help="DataLoader worker processes (default 4, the original's)")
    args = p.parse_args(argv)
    if args.epochs < 1:
        p.error("--epochs must be at least 1")
    if args.workers < 0:
        p.error("--workers must be 0 or more")
    folder, label = find_data(args.data_dir)
    train, val = train_val_split(load_dataset(folder), seed=args.seed)
    print(json.dumps({"data": label, "train": len(train), "val": len(val), "seed": args.seed}), flush=True)

    def report(epoch, accuracy, seconds):
        print(json.dumps({"epoch": epoch, "val_accuracy": round(accuracy, 4), "seconds": round(seconds, 1)}),
              flush=True)

    ref.original_training(train.images, train.labels, val.images, val.labels, epochs=args.epochs, seed=args.seed,
                          workers=args.workers, on_epoch=report)


if __name__ == "__main__":
    main()
