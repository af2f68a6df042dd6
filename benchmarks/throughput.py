"""cifarjax against a PyTorch reference on the same machine, data and networks, measured side by side.

    python -m benchmarks.throughput [--data-dir DIR] [--rows NAME ...] [--json] [--end-to-end]

Each row runs in its own child process, which measures cifarjax (its pmap-ed step on one device) and PyTorch
(eager, on every core) interleaved, five rounds each, every timing at least `MIN_SECONDS` long, and reports the
median images/s of each, their ratio (cifarjax/PyTorch: the median of the rounds' ratios, with their range) and
the child's peak resident memory: both sides together, and cifarjax's alone (taken before PyTorch's side starts).
Each child asks XLA for the schedule the commands choose for the row's settings
(`cifarjax.cpu.process.schedule_for`). `--end-to-end` adds a whole SimpleCNN epoch (`python -m experiments.cnn
--epochs 1` against the original's recipe). Uses ../shared's CIFAR-10 images when present, generated images
otherwise. The rows run under the allocator settings this command was started with: the experiment commands' huge
pages (`cifarjax.cpu.process`) are not added, since they speed both frameworks alike (the 224x224 step where everything
trains, docs/results.md); start it with `GLIBC_TUNABLES=glibc.malloc.hugetlb=1` to measure with them.
`--end-to-end` runs the command as a user does, huge pages included.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from benchmarks.data import find_data  # noqa: E402
from cifarjax.augment import AugmentSpec  # noqa: E402
from cifarjax.config import Config  # noqa: E402
from cifarjax.cpu import process as cpu_process  # noqa: E402
from cifarjax.cpu.process import trim_after_compiling  # noqa: E402
from cifarjax.data import load_dataset, train_val_split  # noqa: E402
from cifarjax.freezing import Freezing  # noqa: E402
from cifarjax.inputs import FeatureInputs, ImageInputs  # noqa: E402
from cifarjax.phases import peak_memory_mb  # noqa: E402
from cifarjax.models import Apply, build_model, init_variables  # noqa: E402
from cifarjax.optim import make_optimizer  # noqa: E402
from cifarjax.target import runs_on_cpu  # noqa: E402
from cifarjax.train import DataParallel, create_train_state  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESNET = dict(model="resnet18")
# Each timing lasts at least this long. A 32x32 row's few steps took 0.1 s, and the machines' speed moves from one
# second to the next (a row's cifarjax side alone ran at 1,290-2,200 images/s within minutes): short timings made
# the ratios noise.
MIN_SECONDS = 1.0
ROUNDS = 5
# name: (description, kind, batch, cifarjax Config changes, PyTorch reference arguments)
ROWS = {
    "cnn_train_64": ("SimpleCNN train step, batch 64", "train", 64, {}, {"net": "cnn"}),
    "cnn_train_512": ("SimpleCNN train step, batch 512", "train", 512, {}, {"net": "cnn"}),
    "cnn_train_64_im2col": ("SimpleCNN train step, batch 64, unfused im2col convolutions", "train", 64,
                            {"conv_impl": "im2col"}, {"net": "cnn"}),
    "cnn_eval_500": ("SimpleCNN evaluation, batch 500", "eval", 500, {}, {"net": "cnn"}),
    "resnet_all_32": ("ResNet-18 train step, everything trains, 32x32, batch 64", "train", 64,
                      {**RESNET, "unfreeze": "all"}, {"net": "resnet", "trains": "all"}),
    "resnet_layer4_32": ("ResNet-18 train step, head + layer4 train, 32x32, batch 64", "train", 64,
                         {**RESNET, "unfreeze": "layer4"},
                         {"net": "resnet", "trains": "layer4", "frozen_bn": "stages"}),
    "resnet_head_bntrain_32": ("ResNet-18 train step, head only, BatchNorm in train mode, 32x32, batch 64", "train", 64,
                               {**RESNET, "unfreeze": "head", "bn": "train"}, {"net": "resnet", "trains": "head"}),
    "resnet_all_224": ("ResNet-18 train step, everything trains, 224x224, batch 32", "train", 32,
                       {**RESNET, "unfreeze": "all", "img_size": 224}, {"net": "resnet", "trains": "all", "size": 224}),
    "resnet_head_bntrain_224": ("ResNet-18 train step, head only, BatchNorm in train mode, 224x224, batch 32", "train",
                                32, {**RESNET, "unfreeze": "head", "bn": "train", "img_size": 224},
                                {"net": "resnet", "trains": "head", "size": 224}),
    "resnet_eval_32": ("ResNet-18 evaluation, 32x32, batch 500", "eval", 500, RESNET, {"net": "resnet"}),
    "resnet_eval_224": ("ResNet-18 evaluation (feature extraction), 224x224, batch 50", "eval", 50,
                        {**RESNET, "img_size": 224}, {"net": "resnet", "size": 224}),
    "resnet_head_cached": ("ResNet-18 head step on cached features (vs PyTorch's frozen step on images), batch 64",
                           "features", 64, {**RESNET, "unfreeze": "head"},
                           {"net": "resnet", "trains": "head", "frozen_bn": "all"}),
}


class CifarjaxRow:
    """cifarjax's side of a row: a compiled step over data resident on one device, timed after a warm-up."""

    def __init__(self, kind: str, batch: int, changes: dict, images: np.ndarray, labels: np.ndarray):
        config = Config(**changes).validate()
        model = build_model(config)
        variables = init_variables(model, config)
        freezing = Freezing.from_config(config)
        trainable = None if freezing.everything_trains else freezing.trainable_mask(variables["params"])
        inputs = FeatureInputs(AugmentSpec()) if kind == "features" else ImageInputs(AugmentSpec.from_config(config))
        apply = Apply(model, "classify" if kind == "features" else None)
        tx = make_optimizer(config, variables["params"]) if kind != "eval" else optax.identity()
        self.parallel = DataParallel(inputs, trainable, jax.local_devices()[:1])
        self.state = self.parallel.replicate(create_train_state(apply, variables, tx, 0))
        if kind == "features":
            images = np.random.default_rng(0).normal(size=(len(labels), 2, 512)).astype(np.float32)
        self.data = self.parallel.replicate((images, labels))
        self.kind, self.batch, self.n = kind, batch, len(labels)
        self.steps = 200 if kind == "features" else 3
        self.rate()  # compile and warm up
        self.steps = steps_lasting(MIN_SECONDS, batch, self.rate(), self.steps)

    def rate(self) -> float:
        rng = np.random.default_rng(0)
        idx = [rng.integers(0, self.n, self.batch).astype(np.int32).reshape(1, -1) for _ in range(self.steps)]
        start = time.perf_counter()
        if self.kind == "eval":
            for i in idx:
                out = self.parallel.eval_step(self.state, self.data, i)
        else:
            for i in idx:
                self.state, out = self.parallel.train_step(self.state, self.data, i)
        jax.block_until_ready(out)
        return self.batch * self.steps / (time.perf_counter() - start)


class TorchRow:
    """PyTorch's side: eager steps on random data of the same shapes, on the GPU where PyTorch sees one (recorded
    as the row's `pytorch_device`), else on every CPU core."""

    def __init__(self, kind: str, batch: int, net: str, trains: str = "all", size: int = 32, frozen_bn=None):
        import torch
        from benchmarks import torch_reference as ref
        torch.set_num_threads(os.cpu_count() or 1)
        self.torch, self.ref, self.kind, self.batch, self.size = torch, ref, kind, batch, size
        self.model = ref.simple_cnn() if net == "cnn" else ref.resnet18(10, trains)
        self.frozen = None
        if frozen_bn == "all":
            self.frozen = True
        elif frozen_bn == "stages":  # cifarjax's frozen stages: stem, layer1..layer3
            m = self.model
            self.frozen = [m.bn1, m.layer1, m.layer2, m.layer3]
        self.steps = 3 if size > 32 else 10
        self.steps = steps_lasting(MIN_SECONDS, batch, self.rate(), self.steps)  # `rate` warms up before it times

    def rate(self) -> float:
        if self.kind == "eval":
            return self.ref.eval_rate(self.model, self.batch, self.steps, self.size)
        return self.ref.train_step_rate(self.model, self.batch, self.steps, self.size, frozen_bn=self.frozen or False)


def steps_lasting(seconds: float, batch: int, rate: float, at_least: int) -> int:
    """Steps of `batch` images that take `seconds` at `rate` images/s, and never fewer than `at_least`."""
    return max(at_least, math.ceil(seconds * rate / batch))


def paired_ratio(rates: list) -> dict:
    """Medians of interleaved (cifarjax, PyTorch) rates and the median of each round's ratio, with the ratios'
    range: a change in the machine's speed between rounds moves both sides of a round alike."""
    ratios = [a / b for a, b in rates]
    return {"cifarjax": round(statistics.median(a for a, _ in rates), 1),
            "pytorch": round(statistics.median(b for _, b in rates), 1),
            "ratio": round(statistics.median(ratios), 3), "ratio_range": [round(min(ratios), 3), round(max(ratios), 3)]}


def schedule_row(name: str) -> str:
    """Before JAX's backend starts, apply the CPU settings the experiment commands apply at their start (huge pages
    aside: `cifarjax.cpu.process`) and ask XLA for the schedule they choose for the row's settings
    (`cifarjax.cpu.process.schedule_for`); returns the scheduler asked for."""
    if not runs_on_cpu():
        return "default"
    cpu_process.add_cpu_flags()
    trim_after_compiling()
    return cpu_process.schedule_for(Config(**ROWS[name][3]))


def measure_row(name: str, images, labels, rounds: int = ROUNDS) -> dict:
    """One row, interleaved: cifarjax then PyTorch, `rounds` times; `paired_ratio` and this process's peak memory,
    both sides together and cifarjax's alone (measured after its step compiled and ran, before PyTorch's side starts;
    later rounds run the same step)."""
    description, kind, batch, changes, torch_args = ROWS[name]
    ours = CifarjaxRow(kind, batch, changes, images, labels)
    ours_peak = peak_memory_mb()
    theirs = TorchRow(kind if kind != "features" else "train", batch, **torch_args)
    rates = [(ours.rate(), theirs.rate()) for _ in range(rounds)]
    return {"name": name, "description": description, **paired_ratio(rates), "unit": "images/s",
            "pytorch_device": theirs.ref.device_name(),
            "peak_rss_mb": peak_memory_mb(), "cifarjax_peak_rss_mb": ours_peak,
            "xla_cpu_scheduler": cpu_process.scheduler()}


def end_to_end(folder: Path, images, labels, val) -> dict:
    """`python -m experiments.cnn --epochs 1` in a child process against the original's recipe for one epoch."""
    from benchmarks import torch_reference as ref
    out = Path(tempfile.mkdtemp()) / "run"
    result = subprocess.run([sys.executable, "-m", "experiments.cnn", "--data-dir", str(folder), "--epochs", "1",
                             "--out", str(out)], cwd=ROOT, capture_output=True, text=True)
    if result.returncode:
        raise SystemExit(f"experiments.cnn failed:\n{result.stderr[-3000:]}")
    summary = json.loads((out / "summary.json").read_text())
    theirs = ref.original_training(images, labels, val.images, val.labels, epochs=1)
    return {"name": "cnn_epoch_end_to_end", "description": "SimpleCNN epoch end to end (whole process vs original)",
            "cifarjax": round(len(labels) / summary["process_seconds"], 1),
            "pytorch": round(len(labels) / theirs["seconds"], 1),
            "ratio": round(theirs["seconds"] / summary["process_seconds"], 3), "unit": "images/s",
            "peak_rss_mb": summary["peak_rss_mb"]}


def cpu_description(cpuinfo: Optional[str] = None) -> str:
    """The CPU's model and its widest vector instructions, e.g. 'AMD EPYC, AVX-512': PyTorch's convolutions use
    AVX-512 where there is one, and the ratios moved with it (docs/results.md). Read from /proc/cpuinfo."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:  # not Linux
            return platform.processor() or platform.machine()
    fields = {}
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())  # the first processor's
    flags = set(fields.get("flags", "").split())
    isa = next((name for flag, name in (("avx512f", "AVX-512"), ("avx2", "AVX2"), ("avx", "AVX")) if flag in flags), "")
    return ", ".join(part for part in (fields.get("model name") or platform.machine(), isa) if part)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.throughput", description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", default=None, help="an ImageFolder or cifar-10-batches-py folder")
    p.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS), help="rows to measure (default: all)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.add_argument("--end-to-end", action="store_true", help="add a whole SimpleCNN epoch against the original's")
    p.add_argument("--row", default=None, help=argparse.SUPPRESS)  # a child process measuring one row
    args = p.parse_args(argv)
    if args.row:
        schedule_row(args.row)
    folder, data_label = find_data(args.data_dir)
    train, val = train_val_split(load_dataset(folder))
    if args.row:
        print(json.dumps(measure_row(args.row, train.images, train.labels)))
        return
    dev = jax.local_devices()[0]
    results = {"data": data_label, "cpu": cpu_description(), "cifarjax_device": f"1 x {dev.device_kind}",
               "threads": os.cpu_count(), "rows": []}
    for name in args.rows:
        command = [sys.executable, "-m", "benchmarks.throughput", "--data-dir", str(folder), "--row", name]
        child = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
        if child.returncode:
            raise SystemExit(f"row {name} failed:\n{child.stderr[-3000:]}")
        results["rows"].append(json.loads(child.stdout.strip().splitlines()[-1]))
        if not args.json:
            r = results["rows"][-1]
            low, high = r["ratio_range"]
            print(f"{r['description']:88s} cifarjax {r['cifarjax']:9.1f}  pytorch {r['pytorch']:9.1f}  "
                  f"ratio {r['ratio']:5.2f} ({low:.2f}-{high:.2f})  peak {r['peak_rss_mb']:6.0f} MB (cifarjax alone "
                  f"{r['cifarjax_peak_rss_mb']:5.0f} MB)", flush=True)
    if args.end_to_end:
        results["rows"].append(end_to_end(folder, train.images, train.labels, val))
    print(json.dumps(results) if args.json else f"data: {data_label}; cifarjax on {results['cifarjax_device']}, "
          f"PyTorch eager on {', '.join(sorted({r.get('pytorch_device', 'CPU') for r in results['rows']}))} "
          f"({results['threads']} CPU threads); CPU: {results['cpu']}")


if __name__ == "__main__":
    main()
