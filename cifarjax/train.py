"""Pure per-device train and eval steps over a `TrainState`, and their one-line `jax.pmap` wrapper.

Each step receives the dataset resident on its device and the indices of its share of the batch; the
`inputs` object (`ImageInputs` or `FeatureInputs`) gathers and augments them on the device. Gradients and
metrics are averaged over devices with `lax.pmean`; BatchNorm statistics are synchronised by the model
(`axis_name=AXIS`). Random choices are drawn for the global batch and sliced per device, so augmentation
is the same whatever the device count; dropout keys differ per device and step.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.training import train_state
from jax import lax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from cifarjax.augment import AugmentSpec, augment, draw, prepare
from cifarjax.optim import FROZEN

AXIS = "devices"


class TrainState(train_state.TrainState):
    """Flax's TrainState plus BatchNorm statistics and the run's base PRNG key."""
    batch_stats: Any = None
    key: Any = None

    @property
    def variables(self):
        return {"params": self.params, "batch_stats": self.batch_stats}


def create_train_state(apply_fn, variables, tx, seed: int) -> TrainState:
    return TrainState.create(apply_fn=apply_fn, params=variables["params"], tx=tx,
                             batch_stats=variables.get("batch_stats", {}), key=jax.random.PRNGKey(seed))


def device_draw(key, per_device: int, device, n_devices: int, spec: AugmentSpec):
    """This device's slice of the random choices drawn for the whole global batch."""
    flips, offsets = draw(key, per_device * n_devices, spec)
    start = device * per_device
    return lax.dynamic_slice_in_dim(flips, start, per_device), lax.dynamic_slice_in_dim(offsets, start, per_device)


@dataclass(frozen=True)
class ImageInputs:
    """Steps over uint8 images: gather by index, then augment (train) or prepare (eval) on the device."""
    spec: AugmentSpec

    def train(self, key, images, idx, device, n_devices):
        flips, offsets = device_draw(key, idx.shape[0], device, n_devices, self.spec)
        return augment(images[idx], flips, offsets, self.spec)

    def eval(self, images, idx):
        return prepare(images[idx], self.spec)


def _keep_frozen(labels, new, old):
    """Frozen leaves keep their exact old bits (adding a zero update could still flip -0.0)."""
    if labels is None:
        return new
    return jax.tree.map(lambda label, n, o: o if label == FROZEN else n, labels, new, old)


def train_step(state: TrainState, data, idx, *, inputs, n_devices: int, labels=None):
    """One optimisation step on this device's share `idx` of the global batch (call under `pmap`)."""
    images, targets = data
    device = lax.axis_index(AXIS)
    step_key = jax.random.fold_in(state.key, state.step)
    x = inputs.train(jax.random.fold_in(step_key, 0), images, idx, device, n_devices)
    y = targets[idx]
    dropout_key = jax.random.fold_in(jax.random.fold_in(step_key, 1), device)

    def loss_fn(params):
        logits, updates = state.apply_fn({"params": params, "batch_stats": state.batch_stats}, x, train=True,
                                         rngs={"dropout": dropout_key}, mutable=["batch_stats"])
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), (logits, updates)

    (loss, (logits, updates)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    grads = lax.pmean(grads, AXIS)
    new_state = state.apply_gradients(grads=grads, batch_stats=updates.get("batch_stats", state.batch_stats))
    new_state = new_state.replace(params=_keep_frozen(labels, new_state.params, state.params))
    metrics = {"loss": loss, "accuracy": jnp.mean(jnp.argmax(logits, -1) == y)}
    return new_state, lax.pmean(metrics, AXIS)


def eval_step(state: TrainState, data, idx, *, inputs):
    """Predicted classes for this device's share `idx` (call under `pmap`)."""
    logits = state.apply_fn(state.variables, inputs.eval(data[0], idx), train=False)
    return jnp.argmax(logits, -1).astype(jnp.int32)


class DataParallel:
    """The pmap-ed steps over `devices` (default: all local devices) and the replicate/unreplicate boundary."""

    def __init__(self, inputs, labels=None, devices: Optional[list] = None):
        self.devices = list(devices or jax.local_devices())
        n = len(self.devices)
        self.sharding = NamedSharding(Mesh(np.array(self.devices), (AXIS,)), PartitionSpec(AXIS))
        self.train_step = jax.pmap(partial(train_step, inputs=inputs, n_devices=n, labels=labels),
                                   axis_name=AXIS, devices=self.devices, donate_argnums=(0,))
        self.eval_step = jax.pmap(partial(eval_step, inputs=inputs), axis_name=AXIS, devices=self.devices)

    @property
    def n_devices(self) -> int:
        return len(self.devices)

    def replicate(self, tree):
        """Copy a host pytree onto every device (leading axis = devices)."""
        n = self.n_devices
        return jax.tree.map(lambda x: jax.device_put(np.broadcast_to(np.asarray(x), (n,) + np.shape(x)),
                                                     self.sharding), tree)

    @staticmethod
    def unreplicate(tree):
        """The first device's copy, as host numpy arrays. Reads the shard directly: indexing would dispatch
        a new program that can deadlock against a queued collective step on CPU devices."""
        return jax.tree.map(lambda x: np.asarray(x.addressable_data(0))[0], tree)

    def predict(self, state, data, n: int, batch_size: int) -> np.ndarray:
        """Predicted classes for examples 0..n-1 of the resident `data`, each counted exactly once."""
        from cifarjax.batching import eval_indices
        idx, mask = eval_indices(n, batch_size, self.n_devices)
        preds = [self.eval_step(state, data, i) for i in idx]
        return np.concatenate([np.asarray(p)[m] for p, m in zip(preds, mask)])
