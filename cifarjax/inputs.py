"""What a step feeds the model, gathered on the device from resident data and the step's indices.

* `ImageInputs`: uint8 images resident on the device; train steps augment them (jitted), eval steps scale,
  resize and normalise them.
* `FeatureInputs`: cached backbone features (N, views, D); view 1 is the mirrored image's, so a flip draw
  picks a view, exactly as the image path would flip the image.
* `HostAugmentedInputs`: a batch already augmented on the host (albumentations) at its decoded size; the
  step's data is the batch itself and its indices are its own rows (see `loop.HostAugmentFeed`).

Random choices are drawn for the global batch and sliced per device, so augmentation does not depend on
how the batch is spread over devices and processes.
"""
from __future__ import annotations

from dataclasses import dataclass

import jax.numpy as jnp

from cifarjax.augment import AugmentSpec, augment, draw_choices, eval_view, flip


def device_choices(key, per_device: int, device, n_devices: int, spec: AugmentSpec):
    """This device's slice of the random choices drawn for the whole global batch."""
    return draw_choices(key, per_device * n_devices, spec).slice(device * per_device, per_device)


@dataclass(frozen=True)
class ImageInputs:
    """uint8 images resident on the device: augmented for training, scaled, resized and normalised for
    evaluation, as `spec` says."""
    spec: AugmentSpec

    def train(self, key, images, idx, device, n_devices):
        return augment(images[idx], device_choices(key, idx.shape[0], device, n_devices, self.spec), self.spec)

    def eval(self, images, idx, mirrored: bool = False):
        x = eval_view(images[idx], self.spec)
        return flip(x, jnp.ones(x.shape[0], bool)) if mirrored else x


@dataclass(frozen=True)
class FeatureInputs:
    spec: AugmentSpec
    cheap_steps = True  # a head on cached features: the loop runs many steps per call (train.train_steps)

    def train(self, key, features, idx, device, n_devices):
        flips = device_choices(key, idx.shape[0], device, n_devices, self.spec).flips
        return features[idx, flips.astype(jnp.int32)]

    def eval(self, features, idx, mirrored: bool = False):
        return features[idx, int(mirrored)]


@dataclass(frozen=True)
class HostAugmentedInputs:
    """Images augmented on the host (uint8 at their decoded size, or whatever the host's transform made): the
    device scales, resizes and normalises them (the host flipped them)."""
    spec: AugmentSpec

    def train(self, key, images, idx, device, n_devices):
        del key, device, n_devices
        return eval_view(images[idx], self.spec)

    def eval(self, images, idx, mirrored: bool = False):
        return ImageInputs(self.spec).eval(images, idx, mirrored)
