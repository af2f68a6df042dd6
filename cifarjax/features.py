"""Frozen-feature caching: with the whole backbone and its BatchNorm fixed and flips the only augmentation, the
backbone's features are a fixed function of the image, so they are computed once per view (as is, mirrored) and the
head trains on them (`inputs.FeatureInputs`), drawing the same flips as the image path would."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from tqdm import tqdm

from cifarjax.augment import AugmentSpec, eval_view, flip
from cifarjax.data import Split, eval_indices
from cifarjax.freezing import Freezing
from cifarjax.models import AXIS
from cifarjax.train import DataParallel


def cacheable(config) -> bool:
    """Features are fixed when the backbone and its BatchNorm are frozen and augmentation is flips only."""
    return (config.model == "resnet18" and config.cache_features and Freezing.from_config(config).backbone_fixed
            and config.crop_padding == 0 and config.cutout == 0 and config.augment_backend == "device")


@functools.lru_cache(maxsize=8)
def _extractor(model, spec: AugmentSpec, devices: tuple):
    """The pmap-ed extraction; `mirrored` is an argument, not a constant, so both views share one program (at
    32x32 a compilation takes 9 s on a 2-core CPU without the compilation cache: 13,000 images' extraction)."""
    def extract(variables, images, mirrored):
        x = eval_view(images, spec)
        x = flip(x, jnp.broadcast_to(mirrored, x.shape[:1]))
        features = model.apply(variables, x, train=False, method="features")  # computed in the model's precision
        return lax.all_gather(features.astype(jnp.promote_types(features.dtype, jnp.float32)), AXIS)
    return jax.pmap(extract, axis_name=AXIS, devices=list(devices), in_axes=(0, 0, None))


def backbone_features(config, model, variables: dict, train: Split, val: Split, devices=None):
    """Cached features for the head, (N, views, D) float32 in every process, view 1 mirrored: (train with 2 views,
    val with 2 when test-time flip averaging needs the mirror, else 1)."""
    parallel = DataParallel(None, devices=devices)
    extract = _extractor(model, AugmentSpec.from_config(config), tuple(parallel.devices))
    replicated = parallel.replicate(variables)

    def features(images, views, desc):
        idx, mask = eval_indices(len(images), config.eval_batch_size, parallel.n_devices)
        out = []
        for view in range(views):
            chunks = [extract(replicated, images[parallel.mine(i)], np.bool_(view))
                      for i in tqdm(idx, desc=f"{desc} view {view}", leave=False, mininterval=2.0,
                                    disable=jax.process_index() != 0)]
            out.append(np.concatenate([parallel.unreplicate(c)[m] for c, m in zip(chunks, mask)]))
        return np.stack(out, axis=1)
    return (Split(features(train.images, 2, "train features"), train.labels),
            Split(features(val.images, 2 if config.tta_flip else 1, "val features"), val.labels))
