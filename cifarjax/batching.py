"""Index batches laid out for the devices, (steps, devices, per_device): the images stay resident on the devices and
each step receives only the indices of its examples."""
from __future__ import annotations

import numpy as np

from cifarjax.errors import UserError


def per_device(batch_size: int, n_devices: int) -> int:
    """The per-device share of a global batch; the batch must split evenly."""
    if batch_size < n_devices or batch_size % n_devices:
        raise UserError(f"batch size {batch_size} does not split evenly over {n_devices} devices; "
                        f"use a multiple of {n_devices}")
    return batch_size // n_devices


def train_indices(n: int, batch_size: int, n_devices: int, seed: int, epoch: int) -> np.ndarray:
    """One epoch's shuffled indices, a function of (seed, epoch) alone so resumed runs repeat it; the last partial
    batch is dropped."""
    b, steps = per_device(batch_size, n_devices), n // batch_size
    if steps == 0:
        raise UserError(f"batch size {batch_size} is larger than the {n} training images; use a smaller batch")
    order = np.random.default_rng([seed, epoch]).permutation(n).astype(np.int32)
    return order[:steps * batch_size].reshape(steps, n_devices, b)


def eval_indices(n: int, batch_size: int, n_devices: int):
    """(indices, mask) covering every example exactly once, the tail padded with index 0 and mask False; per-device
    batches shrink for small sets."""
    b = max(1, min(batch_size, -(-n // n_devices) * n_devices) // n_devices)
    total = -(-n // (b * n_devices)) * b * n_devices
    idx = np.zeros(total, np.int32)
    idx[:n] = np.arange(n)
    return idx.reshape(-1, n_devices, b), (np.arange(total) < n).reshape(-1, n_devices, b)
