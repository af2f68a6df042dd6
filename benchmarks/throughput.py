"""cifarjax against a PyTorch reference on the same machine, data and networks, measured in one run.

    python -m benchmarks.throughput [--data-dir DIR] [--json] [--quick]

Reports images/s and the ratio cifarjax/PyTorch for: the SimpleCNN training step (batch 64 and 512), a whole
SimpleCNN epoch end to end (`python -m experiments.cnn --epochs 1` against the original's recipe:
albumentations per image through a DataLoader with 4 workers, train then evaluate), the frozen ResNet-18
fine-tune step (and the cached-feature head step), and evaluation; plus the peak resident memory of the
experiments.cnn process. Uses ../shared's CIFAR-10 images when present, generated images otherwise.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import jax  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks import torch_reference as ref  # noqa: E402
from benchmarks.data import find_data  # noqa: E402
from cifarjax.augment import AugmentSpec  # noqa: E402
from cifarjax.config import Config  # noqa: E402
from cifarjax.data import load_dataset, train_val_split  # noqa: E402
from cifarjax.freezing import Freezing  # noqa: E402
from cifarjax.inputs import FeatureInputs, ImageInputs  # noqa: E402
from cifarjax.models import Apply, build_model, init_variables  # noqa: E402
from cifarjax.optim import make_optimizer  # noqa: E402
from cifarjax.train import DataParallel, create_train_state  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def jax_rate(parallel, state, data, batch, n_steps, warmup=3):
    n_dev = parallel.n_devices
    idx = [np.random.default_rng(i).integers(0, len(data[1]), batch).astype(np.int32).reshape(n_dev, -1)
           for i in range(warmup + n_steps)]
    resident = parallel.replicate(data)
    for i in idx[:warmup]:
        state, metrics = parallel.train_step(state, resident, parallel.mine(i))
    jax.block_until_ready(metrics)
    start = time.perf_counter()
    for i in idx[warmup:]:
        state, metrics = parallel.train_step(state, resident, parallel.mine(i))
    jax.block_until_ready(metrics)
    return batch * n_steps / (time.perf_counter() - start)


def cifarjax_step_rate(config: Config, images, labels, batch, n_steps, inputs=None, apply_method=None):
    model = build_model(config)
    variables = init_variables(model, config)
    freezing = Freezing.from_config(config)
    trainable = None if freezing.everything_trains else freezing.trainable_mask(variables["params"])
    parallel = DataParallel(inputs or ImageInputs(AugmentSpec.from_config(config)), trainable)
    tx = make_optimizer(config, variables["params"])
    state = parallel.replicate(create_train_state(Apply(model, apply_method), variables, tx, 0))
    return jax_rate(parallel, state, (images, labels), batch, n_steps)


def cifarjax_eval_rate(config: Config, images, labels, batch, repeats=2):
    """Steady-state evaluation: one compiled eval step over resident data, timed after a warm-up pass."""
    import optax
    model = build_model(config)
    variables = init_variables(model, config)
    parallel = DataParallel(ImageInputs(AugmentSpec.from_config(config)))
    state = parallel.replicate(create_train_state(Apply(model), variables, optax.identity(), 0))
    resident = parallel.replicate((images, labels))
    parallel.evaluate(state, resident, len(labels), batch)
    start = time.perf_counter()
    for _ in range(repeats):
        parallel.evaluate(state, resident, len(labels), batch)
    return repeats * len(labels) / (time.perf_counter() - start)


def end_to_end(folder: Path, n_train: int) -> dict:
    """`python -m experiments.cnn --epochs 1` in a child process: epoch wall time and peak RSS."""
    out = Path(tempfile.mkdtemp()) / "run"
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "experiments.cnn", "--data-dir", str(folder), "--epochs", "1",
                             "--out", str(out)], cwd=ROOT, capture_output=True, text=True)
    process_seconds = time.perf_counter() - start
    if result.returncode:
        raise SystemExit(f"experiments.cnn failed:\n{result.stderr[-3000:]}")
    summary = json.loads((out / "summary.json").read_text())
    # The child's own figure: getrusage(RUSAGE_CHILDREN) would count this process's memory, which the
    # child shares between fork and exec.
    return {"seconds": summary["wall_seconds"], "images_per_second": n_train / summary["wall_seconds"],
            "process_seconds": round(process_seconds, 1), "val_accuracy": summary["val_accuracy"],
            "peak_rss_mb": summary["peak_rss_mb"]}


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.throughput", description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", default=None, help="an ImageFolder or cifar-10-batches-py folder")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.add_argument("--quick", action="store_true", help="fewer steps and no end-to-end epoch (a smoke run)")
    p.add_argument("--steps", type=int, default=30, help="timed steps per step benchmark at batch 64")
    args = p.parse_args(argv)
    folder, data_label = find_data(args.data_dir)
    dataset = load_dataset(folder)
    train, val = train_val_split(dataset)
    images, labels = train.images, train.labels
    steps = 5 if args.quick else args.steps
    dev = jax.local_devices()
    results = {"data": data_label, "device": f"{len(dev)} x {dev[0].device_kind}", "torch_device": str(ref.device()),
               "threads": os.cpu_count(), "rows": []}

    def row(name, ours, theirs, unit="images/s"):
        results["rows"].append({"name": name, "cifarjax": round(ours, 1), "pytorch": round(theirs, 1),
                                "ratio": round(ours / theirs, 3), "unit": unit})
        if not args.json:
            print(f"{name:58s} cifarjax {ours:9.1f}  pytorch {theirs:9.1f}  ratio {ours / theirs:5.2f}", flush=True)

    cnn = Config()
    for batch, n in ((64, steps), (512, max(2, steps // 6))):
        row(f"SimpleCNN train step, batch {batch}", cifarjax_step_rate(cnn, images, labels, batch, n),
            ref.train_step_rate(ref.simple_cnn(), batch, n))
    if jax.default_backend() == "cpu":  # what the fused Winograd blocks add over plain im2col convolutions
        row("SimpleCNN train step, batch 64, unfused im2col convolutions",
            cifarjax_step_rate(Config(conv_impl="im2col"), images, labels, 64, steps),
            ref.train_step_rate(ref.simple_cnn(), 64, steps))
    resnet = Config(model="resnet18", unfreeze="head")
    row("frozen ResNet-18 fine-tune step, batch 64, 32x32 (images)",
        cifarjax_step_rate(resnet, images, labels, 64, steps),
        ref.train_step_rate(ref.frozen_resnet18(), 64, steps, frozen_bn=True))
    features = np.random.default_rng(0).normal(size=(len(labels), 2, 512)).astype(np.float32)
    row("frozen ResNet-18 head step on cached features, batch 64",
        cifarjax_step_rate(resnet, features, labels, 64, steps * 20, inputs=FeatureInputs(AugmentSpec()),
                           apply_method="classify"),
        ref.train_step_rate(ref.frozen_resnet18(), 64, steps, frozen_bn=True))
    n_eval = min(len(val), 2000 if args.quick else 5000)
    row("SimpleCNN evaluation, batch 500", cifarjax_eval_rate(Config(), val.images[:n_eval], val.labels[:n_eval], 500),
        ref.eval_rate(ref.simple_cnn(), 500, max(1, n_eval // 500)))
    row("ResNet-18 evaluation, batch 500, 32x32",
        cifarjax_eval_rate(Config(model="resnet18"), val.images[:n_eval], val.labels[:n_eval], 500),
        ref.eval_rate(ref.frozen_resnet18(), 500, max(1, n_eval // 500)))
    if not args.quick:
        ours = end_to_end(folder, len(train))
        theirs = ref.original_training(images, labels, val.images, val.labels, epochs=1)
        row(f"SimpleCNN epoch end to end ({len(train)} train + {len(val)} val images)", ours["images_per_second"],
            len(train) / theirs["seconds"])
        results["end_to_end"] = {"cifarjax": ours, "pytorch_original": theirs}
        results["peak_rss_mb_experiments_cnn"] = ours["peak_rss_mb"]
        if not args.json:
            print(f"peak resident memory of python -m experiments.cnn: {ours['peak_rss_mb']:.0f} MB")
    if args.json:
        print(json.dumps(results))
    else:
        print(f"data: {data_label}; cifarjax on {results['device']}, pytorch on {results['torch_device']}")


if __name__ == "__main__":
    main()
