"""Frozen-feature caching: with the whole backbone and its BatchNorm frozen, backbone features are a fixed
function of the image, so compute them once per augmentation view (as is, mirrored) and train the head on
them. A step draws the same flips as the image path would, so both paths follow the same curve."""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import jax
import numpy as np
from tqdm import tqdm

from cifarjax.augment import AugmentSpec, flip, prepare
from cifarjax.batching import eval_indices
from cifarjax.train import AXIS, DataParallel, device_draw


def cacheable(config) -> bool:
    """Features are fixed when only the head trains, BatchNorm is frozen and augmentation is flips only."""
    return (config.model == "resnet18" and config.cache_features and config.unfreeze == "head"
            and config.bn == "frozen" and config.crop_padding == 0 and config.augment_backend == "device")


def _features(variables, images, mirrored, *, model, spec):
    x = prepare(images, spec)
    if mirrored:
        x = flip(x, np.ones(x.shape[0], bool))
    return model.apply(variables, x, train=False, method="features")


def extract_features(model, variables, images: np.ndarray, spec: AugmentSpec, views: int = 2,
                     batch_size: int = 500, devices=None, desc: str = "features") -> np.ndarray:
    """(N, views, D) float32 backbone features; view 0 as is, view 1 mirrored left-right."""
    parallel = DataParallel(None, devices=devices)
    fn = jax.pmap(partial(_features, model=model, spec=spec), axis_name=AXIS, devices=parallel.devices,
                  static_broadcasted_argnums=(2,))
    replicated = parallel.replicate(variables)
    idx, mask = eval_indices(len(images), batch_size, parallel.n_devices)
    out = []
    for view in range(views):
        chunks = [fn(replicated, images[i], bool(view)) for i in tqdm(idx, desc=f"{desc} view {view}",
                                                                        leave=False, mininterval=2.0)]
        out.append(np.concatenate([np.asarray(c)[m] for c, m in zip(chunks, mask)]))
    return np.stack(out, axis=1)


@dataclass(frozen=True)
class FeatureInputs:
    """Steps over cached features: train data (N, 2, D) picks the drawn view; eval data is (N, D)."""
    spec: AugmentSpec

    def train(self, key, features, idx, device, n_devices):
        flips, _ = device_draw(key, idx.shape[0], device, n_devices, self.spec)
        return features[idx, flips.astype(np.int32)]

    def eval(self, features, idx):
        return features[idx]
