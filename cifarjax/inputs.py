"""What a step feeds the model (images or a frozen backbone's features, gathered on the device by index), and what a
call gets from the host (`ResidentFeed`, `HostAugmentFeed`). Draws are for the global batch, sliced per device: they
do not depend on how the batch is spread over devices and processes."""
from __future__ import annotations

import collections
import functools
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from tqdm import tqdm

from cifarjax.augment import AugmentSpec, Choices, HostAugment, augment, draw_choices, eval_view, flip
from cifarjax.data import Split, eval_indices
from cifarjax.freezing import Freezing
from cifarjax.models import AXIS
from cifarjax.train import DataParallel


def _choices(key, idx, device, n_devices, spec: AugmentSpec) -> Choices:
    """This device's rows of the choices drawn for the whole global batch."""
    rows = idx.shape[0]
    return Choices(*(jax.lax.dynamic_slice_in_dim(x, device * rows, rows)
                     for x in draw_choices(key, rows * n_devices, spec)))


@dataclass(frozen=True)
class ImageInputs:
    """uint8 images resident on the device: augmented for training; scaled, resized and normalised for evaluation."""
    spec: AugmentSpec

    def train(self, key, images, idx, device, n_devices):
        return augment(images[idx], _choices(key, idx, device, n_devices, self.spec), self.spec)

    def eval(self, images, idx, mirrored: bool = False):
        x = eval_view(images[idx], self.spec)
        return flip(x, jnp.ones(x.shape[0], bool)) if mirrored else x


@dataclass(frozen=True)
class HostAugmentedInputs(ImageInputs):
    """Images augmented on the host (`HostAugmentFeed`): the device only scales, resizes and normalises them."""

    def train(self, key, images, idx, device, n_devices):
        return eval_view(images[idx], self.spec)


@dataclass(frozen=True)
class FeatureInputs:
    """Cached backbone features (N, views, D), view 1 the mirrored image's: a flip draw picks the view."""
    spec: AugmentSpec
    cheap_steps = True  # a head on cached features: the loop runs many steps per call (train.train_steps)

    def train(self, key, features, idx, device, n_devices):
        return features[idx, _choices(key, idx, device, n_devices, self.spec).flips.astype(jnp.int32)]

    def eval(self, features, idx, mirrored: bool = False):
        return features[idx, int(mirrored)]


def cacheable(config) -> bool:
    """Whether features are a fixed function of the image: the backbone and its BatchNorm frozen, flips the only
    augmentation (the head then trains on `backbone_features`, drawing the same flips as the image path would)."""
    return (config.model == "resnet18" and config.cache_features and Freezing.from_config(config).backbone_fixed
            and config.crop_padding == 0 and config.cutout == 0 and config.augment_backend == "device")


@functools.lru_cache(maxsize=8)
def _extractor(model, spec: AugmentSpec, devices: tuple):
    """The pmap-ed extraction; `mirrored` is an argument, not a constant, so both views share one program (a compile
    at 32x32: 9 s on a 2-core CPU)."""
    def extract(variables, images, mirrored):
        x = eval_view(images, spec)
        x = flip(x, jnp.broadcast_to(mirrored, x.shape[:1]))
        features = model.apply(variables, x, train=False, method="features")  # computed in the model's precision
        return lax.all_gather(features.astype(jnp.promote_types(features.dtype, jnp.float32)), AXIS)
    return jax.pmap(extract, axis_name=AXIS, devices=list(devices), in_axes=(0, 0, None))


def backbone_features(config, model, variables: dict, train: Split, val: Split, devices=None):
    """(train, val) features (N, views, D) float32 in every process, view 1 the mirrored image's (train: 2 views;
    val: 2 with tta_flip, else 1)."""
    parallel = DataParallel(None, devices=devices)
    extract = _extractor(model, AugmentSpec.from_config(config), tuple(parallel.devices))
    replicated = parallel.replicate(variables)

    def features(split, views, desc):
        idx, mask = eval_indices(len(split), config.eval_batch_size, parallel.n_devices)
        out = []
        for view in range(views):  # one at a time: a view's device outputs are freed before the next's
            chunks = [extract(replicated, split.images[parallel.mine(i)], np.bool_(view))
                      for i in tqdm(idx, desc=f"{desc} view {view}", leave=False, mininterval=2.0,
                                    disable=jax.process_index() != 0)]
            out.append(np.concatenate([parallel.unreplicate(c)[m] for c, m in zip(chunks, mask)]))
        return Split(np.stack(out, axis=1), split.labels)
    return features(train, 2, "train features"), features(val, 2 if config.tta_flip else 1, "val features")


class ResidentFeed:
    """The training data lives on the devices; a step receives only this process's rows of the indices."""

    def __init__(self, parallel, split):
        self.parallel, self.data = parallel, parallel.replicate((split.images, split.labels))

    def __call__(self, idx: np.ndarray, step: int):
        return self.data, self.parallel.mine(idx, axis=idx.ndim - 2)

    def ahead(self, batches):
        return batches


class HostAugmentFeed:
    """Every process augments the whole global batch (so draws do not depend on how the devices are spread) and
    places its own rows; `ahead` prepares the next calls' batches while the device runs the current one."""
    DEPTH = 2  # calls prepared ahead

    def __init__(self, parallel, split, augment: HostAugment):
        self.parallel, self.split, self.augment = parallel, split, augment
        self.prepared = {}  # first step of a call -> (its indices, the Future of its placed batch), from `ahead`

    def __call__(self, idx: np.ndarray, step: int):
        """The batch of `idx` (one step's or a call's) from `step` on, as `ahead` prepared it or prepared now."""
        prepared_idx, future = self.prepared.pop(step, (None, None))
        return future.result() if np.array_equal(prepared_idx, idx) else self.prepare(idx, step)

    def prepare(self, idx: np.ndarray, step: int):
        """Each step's batch augmented with its own step's draws; a device holds its rows of every step."""
        steps = idx.reshape((-1,) + idx.shape[-2:])
        images = np.concatenate([self.augment(self.split.images[i], step + s) for s, i in enumerate(steps)], axis=1)
        labels = np.concatenate(self.split.labels[steps], axis=1)
        n, _, per_device = steps.shape  # a step's rows follow the previous steps' on each device
        rows = np.broadcast_to(np.arange(n * per_device, dtype=np.int32).reshape(n, 1, per_device), steps.shape)
        p = self.parallel
        return p.shard((p.mine(images), p.mine(labels))), p.mine(rows.reshape(idx.shape), axis=idx.ndim - 2)

    def ahead(self, batches):
        """`batches` ((`schedule.Call`, its indices) per call) passed through while one thread prepares the next
        `DEPTH` calls' batches in order; closing it cancels what has not started and waits for the one under way."""
        pool, queued = ThreadPoolExecutor(1, thread_name_prefix="host-augment"), collections.deque()
        try:
            for call, idx in batches:
                self.prepared[call.first] = idx, pool.submit(self.prepare, idx, call.first)
                queued.append((call, idx))
                if len(queued) > self.DEPTH:
                    yield queued.popleft()
            yield from queued
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
            self.prepared.clear()
