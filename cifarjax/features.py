"""Frozen-feature caching: when the freezing policy leaves the whole backbone and its BatchNorm fixed and the
augmentation is flips only, backbone features are a fixed function of the image, so compute them once per view
(as is, mirrored) and train the head on them (`inputs.FeatureInputs`). A step draws the same flips as the image
path would, so both paths follow the same curve."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from tqdm import tqdm

from cifarjax.augment import AugmentSpec, eval_view, flip
from cifarjax.batching import eval_indices
from cifarjax.data import Split
from cifarjax.freezing import Freezing
from cifarjax.models import AXIS
from cifarjax.train import DataParallel


def cacheable(config) -> bool:
    """Features are fixed when the backbone and its BatchNorm are frozen and augmentation is flips only."""
    return (config.model == "resnet18" and config.cache_features and Freezing.from_config(config).backbone_fixed
            and config.crop_padding == 0 and config.cutout == 0 and config.augment_backend == "device")


def _features(variables, images, mirrored, *, model, spec):
    x = eval_view(images, spec)
    x = flip(x, jnp.broadcast_to(mirrored, x.shape[:1]))
    features = model.apply(variables, x, train=False, method="features")  # computed in the model's precision
    return lax.all_gather(features.astype(jnp.promote_types(features.dtype, jnp.float32)), AXIS)


@functools.lru_cache(maxsize=8)
def _extractor(model, spec: AugmentSpec, devices: tuple):
    """The pmap-ed extraction; `mirrored` is an argument, not a constant, so both views share one program (at
    32x32 a compilation takes 9 s on a 2-core CPU without the compilation cache: 13,000 images' extraction)."""
    return jax.pmap(functools.partial(_features, model=model, spec=spec), axis_name=AXIS, devices=list(devices),
                    in_axes=(0, 0, None))


def extract_features(model, variables, images: np.ndarray, spec: AugmentSpec, views: int = 2,
                     batch_size: int = 500, devices=None, desc: str = "features") -> np.ndarray:
    """(N, views, D) float32 backbone features; view 0 as is, view 1 mirrored left-right. Every process gets
    all of them."""
    parallel = DataParallel(None, devices=devices)
    fn = _extractor(model, spec, tuple(parallel.devices))
    replicated = parallel.replicate(variables)
    idx, mask = eval_indices(len(images), batch_size, parallel.n_devices)
    out = []
    for view in range(views):
        chunks = [fn(replicated, images[parallel.mine(i)], np.bool_(view))
                  for i in tqdm(idx, desc=f"{desc} view {view}", leave=False, mininterval=2.0,
                                disable=jax.process_index() != 0)]
        out.append(np.concatenate([parallel.unreplicate(c)[m] for c, m in zip(chunks, mask)]))
    return np.stack(out, axis=1)


def backbone_features(config, model, variables: dict, train, val, devices=None):
    """Cached features for the head: (train (N, 2, D), val (N, views, D)); validation keeps the mirrored view
    only when test-time flip averaging needs it."""
    spec = AugmentSpec.from_config(config)
    kw = dict(batch_size=config.eval_batch_size, devices=devices)
    train_f = extract_features(model, variables, train.images, spec, views=2, desc="train features", **kw)
    val_f = extract_features(model, variables, val.images, spec, views=2 if config.tta_flip else 1,
                             desc="val features", **kw)
    return Split(train_f, train.labels), Split(val_f, val.labels)
