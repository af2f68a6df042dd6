"""What the experiment commands share: flags for the Config, loading data, run folders, outputs."""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import jax  # noqa: E402
import numpy as np  # noqa: E402

import cifarjax  # noqa: E402
from cifarjax import plots, runs  # noqa: E402
from cifarjax.config import Config  # noqa: E402
from cifarjax.data import SOURCES, load_dataset, train_val_split  # noqa: E402
from cifarjax.loop import predict  # noqa: E402


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1")
    return value


def non_negative_int(text: str) -> int:
    value = positive_int(text) if text.strip() != "0" else 0
    return value


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{value} must be positive")
    return value


def make_parser(prog: str, description: str, defaults: Config) -> argparse.ArgumentParser:
    """Flags for every Config field the experiments share, plus data and run-folder flags."""
    p = argparse.ArgumentParser(prog=prog, description=description,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("training (the original's Config)")
    g.add_argument("--batch-size", type=positive_int, default=defaults.batch_size,
                   help="global batch size, split evenly over the devices")
    g.add_argument("--lr", type=positive_float, default=defaults.lr, help="Adam learning rate")
    g.add_argument("--eval-every", type=non_negative_int, default=defaults.eval_every,
                   help="evaluate on the validation split every N steps (0: only at epoch ends)")
    g.add_argument("--seed", type=int, default=defaults.seed, help="seed of initialisation, split, order, augmentation")
    g.add_argument("--img-size", type=positive_int, default=defaults.img_size,
                   help="size the network sees (images are resized on the device)")
    g.add_argument("--normalize", choices=("none", "imagenet", "dataset"), default=defaults.normalize,
                   help="per-channel normalisation after scaling to [0, 1]")
    g.add_argument("--crop-padding", type=non_negative_int, default=defaults.crop_padding,
                   help="pad-and-random-crop by N pixels (0: off, as in the original)")
    g.add_argument("--augment", choices=("device", "albumentations"), default=defaults.augment_backend,
                   help="where augmentation runs: jitted on the device, or albumentations per image on the host")
    g.add_argument("--conv-impl", choices=("auto", "winograd", "im2col", "xla"), default=defaults.conv_impl,
                   help="convolution formulation (auto: Winograd-fused SimpleCNN blocks and im2col on CPU, "
                        "XLA/cuDNN on GPU)")
    g.add_argument("--checkpoint-every", type=non_negative_int, default=defaults.checkpoint_every,
                   help="also checkpoint every N steps (0: only at epoch ends)")
    d = p.add_argument_group("data")
    d.add_argument("--dataset", choices=SOURCES, default="auto",
                   help="auto: --data-dir's contents, or CIFAR-10 downloaded when no --data-dir is given")
    d.add_argument("--data-dir", default=None,
                   help="a folder holding cifar-10-batches-py or DIR/train/<class>/*.jpg (+ optional DIR/test/...)")
    d.add_argument("--decode-size", type=positive_int, default=defaults.decode_size,
                   help="images are decoded and stored at this size")
    r = p.add_argument_group("run folder")
    r.add_argument("--out", default=None, help="run folder (default: runs/<experiment>-<timestamp>)")
    r.add_argument("--overwrite", action="store_true", help="replace an existing run folder")
    r.add_argument("--resume", action="store_true", help="continue the run in --out from its latest checkpoint")
    return p


def config_from_args(args, **fixed) -> Config:
    return Config(batch_size=args.batch_size, lr=args.lr, eval_every=args.eval_every, seed=args.seed,
                  img_size=args.img_size, normalize=args.normalize, crop_padding=args.crop_padding,
                  augment_backend=args.augment, conv_impl=args.conv_impl, checkpoint_every=args.checkpoint_every,
                  dataset=args.dataset, data_dir=args.data_dir, decode_size=args.decode_size, **fixed).validate()


def load_splits(config: Config):
    """(dataset, train, val) with the original's seeded 80/20 split."""
    dataset = load_dataset(config.data_dir, config.dataset, config.decode_size)
    train, val = train_val_split(dataset, config.val_fraction, config.seed)
    config.classes = dataset.classes
    config.num_classes = len(dataset.classes)
    return dataset, train, val


def peak_memory_mb() -> float:
    """This process's peak resident memory in MB (Linux VmHWM: not inflated by a parent that forked it)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    import resource
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / (1024 * 1024 if sys.platform == "darwin" else 1024), 1)


def environment() -> dict:
    """Where a run ran, and its peak memory so far, for summary.json."""
    devices = jax.local_devices()
    return {"device_kind": devices[0].device_kind, "device_count": len(devices), "platform": devices[0].platform,
            "jax": jax.__version__, "cifarjax": cifarjax.__version__, "host": platform.node(),
            "cpu_count": os.cpu_count(), "peak_rss_mb": peak_memory_mb()}


def report_split(config: Config, variables: dict, split, name: str, run: Path, n_samples: int = 32) -> dict:
    """Accuracy on `split`, with its confusion-matrix and sample-prediction plots in run/plots."""
    preds = predict(config, variables, split)
    plots.plot_confusion_matrix(plots.confusion_matrix(split.labels, preds, len(config.classes)), config.classes,
                                run / runs.PLOTS / "confusion_matrix.png",
                                title=f"Confusion matrix ({name} split, {len(split)} images)")
    pick = np.random.default_rng(0).choice(len(split), min(n_samples, len(split)), replace=False)
    plots.plot_sample_predictions(split.images[pick], preds[pick], split.labels[pick], config.classes,
                                  run / runs.PLOTS / "sample_predictions.png")
    return {f"{name}_accuracy": float(np.mean(preds == split.labels)), "scored_split": name}


def now() -> float:
    return time.perf_counter()
