"""Augmentation: the original's pipeline on the device (jitted, a function of a PRNG key), or any albumentations
pipeline per image on the host (slower). Evaluation images are only scaled, resized and normalised."""
from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from cifarjax.errors import UserError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def with_normalization(config, train_images: np.ndarray):
    """`config` with norm_mean/norm_std resolved from config.normalize ('dataset': from the uint8 `train_images`)."""
    if config.normalize == "none" or config.norm_mean is not None:
        return config
    if config.normalize == "imagenet":
        return config.replace(norm_mean=IMAGENET_MEAN, norm_std=IMAGENET_STD)
    pixels = train_images.reshape(-1, 3)
    mean, sq = np.zeros(3), np.zeros(3)
    for chunk in np.array_split(pixels, max(1, len(pixels) // 4_000_000)):  # float64 sums without a float64 copy
        mean += chunk.sum(0, dtype=np.float64)  # one pass over the images: each chunk read once, while in cache
        sq += np.square(chunk, dtype=np.float64).sum(0)
    mean, sq = mean / len(pixels) / 255.0, sq / len(pixels) / 255.0**2
    std = np.sqrt(np.maximum(sq - mean**2, 0.0))
    if not (std > 1e-6).all():
        raise UserError(f"the training images do not vary in channel {int(np.argmin(std))} (std {std.min():.2g}), "
                        "so dataset normalisation would divide by zero; use --normalize none or imagenet")
    return config.replace(norm_mean=tuple(float(m) for m in mean), norm_std=tuple(float(s) for s in std))


@dataclass(frozen=True)
class AugmentSpec:
    """What the device pipeline does. Hashable, so it can be a static argument of a jitted step."""
    img_size: int = 32
    flip: bool = True
    crop_padding: int = 0
    mean: Optional[tuple] = None
    std: Optional[tuple] = None
    cutout: int = 0

    @classmethod
    def from_config(cls, config) -> "AugmentSpec":
        return cls(config.img_size, config.flip, config.crop_padding, config.norm_mean, config.norm_std, config.cutout)


class Choices(NamedTuple):
    """The random choices of a batch: flips (n,) bool, crop offsets (n, 2) and cutout corners (n, 2) int32."""
    flips: jax.Array
    offsets: jax.Array
    corners: jax.Array


def draw_choices(key, n: int, spec: AugmentSpec) -> Choices:
    """Random choices for a global batch of n (the cutout draw does not disturb the flips and crops)."""
    flip_key, crop_key = jax.random.split(key)
    flips = jax.random.bernoulli(flip_key, 0.5, (n,)) if spec.flip else jnp.zeros((n,), bool)
    offsets = jax.random.randint(crop_key, (n, 2), 0, 2 * spec.crop_padding + 1)
    corners = (jax.random.randint(jax.random.fold_in(key, 2), (n, 2), 0, spec.img_size) if spec.cutout
               else jnp.zeros((n, 2), jnp.int32))
    return Choices(flips, offsets, corners)


def flip(images, flips):
    """Mirror left-right the images whose flag is set."""
    return jnp.where(flips[:, None, None, None], images[:, :, ::-1, :], images)


def crop(images, offsets, padding: int):
    """Zero-pad by `padding` and cut each image back to its size at its (dy, dx) offset."""
    if padding == 0:
        return images
    n, h, w, c = images.shape
    padded = jnp.pad(images, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
    return jax.vmap(lambda im, o: jax.lax.dynamic_slice(im, (o[0], o[1], 0), (h, w, c)))(padded, offsets)


def cut_out(images, corners, size: int):
    """Zero a size x size square of each image centred at its corner draw (clipped at the borders)."""
    if size == 0:
        return images
    n, h, w, _ = images.shape
    rows, cols = jnp.arange(h)[None, :, None], jnp.arange(w)[None, None, :]
    top, left = corners[:, 0, None, None] - size // 2, corners[:, 1, None, None] - size // 2
    inside = (rows >= top) & (rows < top + size) & (cols >= left) & (cols < left + size)
    return jnp.where(inside[..., None], jnp.zeros((), images.dtype), images)


def augment(images, choices: Choices, spec: AugmentSpec):
    """Training view of a batch: random crop, random flip, then `eval_view`, then cutout."""
    x = flip(crop(images, choices.offsets, spec.crop_padding), choices.flips)  # on uint8: crop pads with 0 either way
    return cut_out(eval_view(x, spec), choices.corners, spec.cutout)


def eval_view(images, spec: AugmentSpec):
    """Evaluation view of a batch: scale uint8 to [0, 1] (float input passes), resize, normalise; no randomness."""
    images = images.astype(jnp.float32) / (255.0 if jnp.issubdtype(images.dtype, jnp.integer) else 1.0)
    n, h, w, c = images.shape
    if (h, w) != (spec.img_size, spec.img_size):
        images = jax.image.resize(images, (n, spec.img_size, spec.img_size, c), "bilinear")
    if spec.mean is not None:
        images = (images - jnp.asarray(spec.mean, jnp.float32)) / jnp.asarray(spec.std, jnp.float32)
    return images


class HostAugment:
    """An albumentations `A.Compose` (default: the original's flip) per uint8 image on the host, its draws a function
    of (seed, step) so a resumed run augments as an uninterrupted one; the device scales, resizes and normalises."""

    def __init__(self, transform=None, seed: int = 0):
        if transform is None:  # the original's Resize and ToFloat(255) run on the device: 1 byte a pixel crosses
            import albumentations as A
            transform = A.Compose([A.HorizontalFlip(p=0.5)])
        self.transform, self.seed, self.lock = transform, seed, threading.Lock()

    def __call__(self, images: np.ndarray, step: int) -> np.ndarray:
        flat = images.reshape((-1,) + images.shape[-3:])
        with self.lock:  # the transform's random state is shared: one batch draws at a time
            self.transform.set_random_seed(int(np.random.SeedSequence([self.seed, step]).generate_state(1)[0]))
            out = np.stack([self.transform(image=im)["image"] for im in flat])
        return out.reshape(images.shape[:-3] + out.shape[1:])
