"""Index batches laid out for the devices: (steps, devices, per_device_batch).

The images stay resident on the devices; each step receives only the indices of its examples.
"""
from __future__ import annotations

import numpy as np

from cifarjax.errors import UserError


def per_device(batch_size: int, n_devices: int) -> int:
    """The per-device share of a global batch; the batch must split evenly."""
    if batch_size < n_devices or batch_size % n_devices:
        raise UserError(f"batch size {batch_size} does not split evenly over {n_devices} devices; "
                        f"use a multiple of {n_devices}")
    return batch_size // n_devices


def epoch_permutation(n: int, seed: int, epoch: int) -> np.ndarray:
    """The example order of one epoch: a function of (seed, epoch) alone, so resumed runs repeat it."""
    return np.random.default_rng([seed, epoch]).permutation(n).astype(np.int32)


def train_indices(n: int, batch_size: int, n_devices: int, seed: int, epoch: int) -> np.ndarray:
    """(steps, devices, per_device) shuffled indices of one epoch; the last partial batch is dropped."""
    b = per_device(batch_size, n_devices)
    steps = n // batch_size
    if steps == 0:
        raise UserError(f"batch size {batch_size} is larger than the {n} training images; use a smaller batch")
    return epoch_permutation(n, seed, epoch)[:steps * batch_size].reshape(steps, n_devices, b)


def eval_indices(n: int, batch_size: int, n_devices: int):
    """(indices, mask), each (steps, devices, per_device), covering every example exactly once.

    The tail is padded with index 0 and mask False; per-device batches shrink for small sets.
    """
    batch_size = min(batch_size, -(-n // n_devices) * n_devices)
    b = max(1, batch_size // n_devices)
    total = -(-n // (b * n_devices)) * b * n_devices
    idx = np.zeros(total, np.int32)
    idx[:n] = np.arange(n)
    mask = np.arange(total) < n
    return idx.reshape(-1, n_devices, b), mask.reshape(-1, n_devices, b)
