"""The albumentations backend's host side at 224x224: the host's time per batch of 64 (augment and place it), then a
short head-only ResNet-18 fine-tune at 224x224 with `--augment albumentations`, timed by `fit`.

    python -m benchmarks.host_pipeline      # prints two JSON lines
"""
import json
import time

import jax
import numpy as np

from cifarjax.augment import AugmentSpec, HostAugment
from cifarjax.config import Config
from cifarjax.data import Split
from cifarjax.inputs import HostAugmentedInputs, HostAugmentFeed
from cifarjax.loop import fine_tune_loop
from cifarjax.models import build_model, init_variables
from cifarjax.train import DataParallel


def split(n: int, seed: int) -> Split:
    rng = np.random.default_rng(seed)
    return Split(rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8), (np.arange(n) % 10).astype(np.int32))


def main():
    data = split(512, 0)
    # Before b6a1acf the host resized: HostAugment took the size.
    old = "img_size" in HostAugment.__init__.__code__.co_varnames
    augment = HostAugment(img_size=224, seed=0) if old else HostAugment(seed=0)
    parallel = DataParallel(HostAugmentedInputs(AugmentSpec(img_size=224)), devices=jax.local_devices()[:1])
    feed = HostAugmentFeed(parallel, data, augment)
    seconds = []
    for s in range(12):
        start = time.perf_counter()
        (images, _), _ = feed(np.arange(64, dtype=np.int32).reshape(1, 64) + 64 * (s % 8), s)
        jax.block_until_ready(images)
        seconds.append(time.perf_counter() - start)
    host = {"host_ms_per_batch_64": round(1000 * float(np.median(seconds[2:])), 1),
            "placed_mb": round(images.nbytes / 1e6, 2), "dtype": str(images.dtype)}
    print(json.dumps(host), flush=True)
    config = Config(model="resnet18", unfreeze="head", cache_features=False, img_size=224, batch_size=32, n_epochs=1,
                    augment_backend="albumentations", eval_every=0, eval_batch_size=32, checkpoint_seconds=0).validate()
    result = fine_tune_loop(config, init_variables(build_model(config), config), split(192, 1), split(32, 2))
    print(json.dumps({**host, **result.this_process}), flush=True)


if __name__ == "__main__":
    main()
