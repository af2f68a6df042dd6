"""The images benchmarks measure on: --data-dir, else ../shared's CIFAR-10 JPEGs, else generated ones."""
from __future__ import annotations

import tarfile
import tempfile
from pathlib import Path

import numpy as np

from cifarjax.runs import cache_dir

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10-jpeg-train.tar.gz"


def find_data(data_dir):
    """(folder, description): --data-dir, else ../shared's CIFAR-10 JPEGs unpacked into the cache, else generated."""
    if data_dir:
        return Path(data_dir), f"--data-dir {data_dir}"
    if SHARED.is_file():
        target = cache_dir() / "shared-cifar10-jpeg"
        if not (target / "cifar10-jpeg" / "train").is_dir():
            with tarfile.open(SHARED) as tar:
                tar.extractall(target, filter="data")
        return target / "cifar10-jpeg", "CIFAR-10 training images from ../shared (50,000 JPEGs, 40,000/10,000 split)"
    from PIL import Image
    folder = Path(tempfile.mkdtemp()) / "generated"
    rng = np.random.default_rng(0)
    for c in range(10):
        (folder / "train" / f"class{c}").mkdir(parents=True)
        for i in range(625):
            pixels = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / "train" / f"class{c}" / f"{i}.png")
    return folder, "generated random images (6,250; ../shared not found)"
