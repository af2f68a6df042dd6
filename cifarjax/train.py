"""Pure per-device train and eval steps over a `TrainState`, and their `jax.pmap` over every device of every process:
a step gathers its share of the batch from device-resident data; gradients, metrics and BatchNorm statistics are
averaged over devices, and dropout keys depend on (step, global device index), whatever the processes."""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.training import train_state
from jax import lax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from cifarjax.data import eval_indices
from cifarjax.freezing import Freezing, join_frozen, leaves_like, split_frozen
from cifarjax.models import AXIS
from cifarjax.target import step_factory


class TrainState(train_state.TrainState):
    """Flax's TrainState plus BatchNorm statistics, the base PRNG key and optionally a moving average of what
    training changes alone (`Freezing.averaged`): frozen leaves are their own average, never copied."""
    batch_stats: Any = None
    key: Any = None
    ema_params: Any = None
    ema_batch_stats: Any = None

    @property
    def variables(self):
        return {"params": self.params, "batch_stats": self.batch_stats}

    @property
    def eval_variables(self):
        """The weights evaluation uses: the moving average where the run keeps one."""
        if self.ema_params is None:
            return self.variables
        return {"params": join_frozen(self.ema_params, self.params),
                "batch_stats": join_frozen(self.ema_batch_stats, self.batch_stats)}


def create_train_state(apply_fn, variables, tx, seed: int, ema: bool = False,
                       freezing: Freezing = Freezing()) -> TrainState:
    """`ema`: keep a moving average of what trains under `freezing` (default: everything)."""
    average = freezing.averaged(variables) if ema else {"params": None, "batch_stats": None}
    return TrainState.create(apply_fn=apply_fn, params=variables["params"], tx=tx,
                             batch_stats=variables.get("batch_stats", {}), key=jax.random.PRNGKey(seed),
                             ema_params=average["params"], ema_batch_stats=average["batch_stats"])


@dataclass(frozen=True)
class StepOptions:
    """Static settings of the steps (hashable, part of the compiled program)."""
    label_smoothing: float = 0.0
    ema_decay: float = 0.0
    tta_flip: bool = False

    @classmethod
    def from_config(cls, config) -> "StepOptions":
        return cls(config.label_smoothing, config.ema_decay, config.tta_flip)


def cross_entropy(logits, labels, smoothing: float = 0.0):
    """Per-example cross-entropy against integer labels, optionally label-smoothed, in float32 or wider."""
    logits = logits.astype(jnp.promote_types(logits.dtype, jnp.float32))
    if not smoothing:
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    targets = optax.smooth_labels(jax.nn.one_hot(labels, logits.shape[-1]), smoothing)
    return optax.softmax_cross_entropy(logits, targets)


def ema_update(ema, params, decay: float, step):
    """ema·d + params·(1-d) with d = min(decay, (1 + step) / (10 + step)), so early averages warm up quickly."""
    d = jnp.minimum(decay, (1.0 + step) / (10.0 + step))
    return jax.tree.map(lambda e, p: e * d + p * (1.0 - d), ema, params)


def train_step(state: TrainState, data, idx, *, inputs, n_devices: int, trainable=None,
               options: StepOptions = StepOptions(), differentiate_frozen: bool = False):
    """One step on this device's share `idx` of the batch; `trainable`: the freezing mask (None: all trains);
    `differentiate_frozen`: differentiate every parameter, the compiler drops the unused part (the CPU program's)."""
    device, step_key = lax.axis_index(AXIS), jax.random.fold_in(state.key, state.step)
    x, y = inputs.train(jax.random.fold_in(step_key, 0), data[0], idx, device, n_devices), data[1][idx]
    dropout_key = jax.random.fold_in(jax.random.fold_in(step_key, 1), device)

    whole = trainable is None or differentiate_frozen
    trained, frozen = (state.params, {}) if whole else split_frozen(state.params, trainable)

    def loss_fn(trained):
        params = join_frozen(trained, frozen)
        logits, updates = state.apply_fn({"params": params, "batch_stats": state.batch_stats}, x, train=True,
                                         rngs={"dropout": dropout_key}, mutable=["batch_stats"])
        return cross_entropy(logits, y, options.label_smoothing).mean(), (logits, updates)

    # Only what trains is differentiated: frozen layers run forward only, and their gradients are never computed
    # nor averaged over devices (the optimizer's frozen rule ignores the zeros that stand in for them).
    (loss, (logits, updates)), grads = jax.value_and_grad(loss_fn, has_aux=True)(trained)
    if n_devices > 1:  # over one device the mean is the identity, but XLA would still copy every gradient
        grads = lax.pmean(grads, AXIS)
    grads = join_frozen(grads, jax.tree.map(jnp.zeros_like, frozen))
    new_state = state.apply_gradients(grads=grads, batch_stats=updates.get("batch_stats", state.batch_stats))
    if trainable is not None:  # frozen leaves keep their exact old bits (adding a zero update could flip -0.0)
        kept = jax.tree.map(lambda trains, n, o: n if trains else o, trainable, new_state.params, state.params)
        new_state = new_state.replace(params=kept)
    if options.ema_decay:  # over the leaves training changes only (`TrainState`)
        average = [ema_update(e, leaves_like(n, e), options.ema_decay, state.step) for e, n in
                   ((state.ema_params, new_state.params), (state.ema_batch_stats, new_state.batch_stats))]
        new_state = new_state.replace(ema_params=average[0], ema_batch_stats=average[1])
    metrics = {"loss": loss, "accuracy": jnp.mean(jnp.argmax(logits, -1) == y)}
    return new_state, lax.pmean(metrics, AXIS)


def train_steps(state: TrainState, data, idxs, **kwargs):
    """Several `train_step`s in one call, a rolled `lax.scan` over idxs' leading axis; metrics per step. Equal to
    that many calls within float32 rounding: XLA's fusions in a loop body may round differently."""
    return lax.scan(lambda state, idx: train_step(state, data, idx, **kwargs), state, idxs)


def eval_logits(state: TrainState, data, idx, inputs, tta_flip: bool):
    """Logits in float32 (or wider), whatever the model computes them in; with `tta_flip`, the mirror's averaged in."""
    logits = [state.apply_fn(state.eval_variables, inputs.eval(data[0], idx, mirrored), train=False)
              for mirrored in (False, True)[:1 + tta_flip]]
    logits = [x.astype(jnp.promote_types(x.dtype, jnp.float32)) for x in logits]
    return (logits[0] + logits[1]) / 2 if tta_flip else logits[0]


def eval_step(state: TrainState, data, idx, *, inputs, tta_flip: bool = False, probabilities: bool = False):
    """This device's share `idx`, gathered: predicted classes and per-example losses, each (devices, per_device),
    or with `probabilities` the class probabilities, (devices, per_device, classes)."""
    logits = eval_logits(state, data, idx, inputs, tta_flip)
    if probabilities:
        return lax.all_gather(jax.nn.softmax(logits.astype(jnp.float32)), AXIS)
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, data[1][idx])
    preds = jnp.argmax(logits, -1).astype(jnp.int32)
    return lax.all_gather(preds, AXIS), lax.all_gather(losses, AXIS)


def donate_state(step, mask, axis_name: str, devices: list, **static):
    """`step` pmap-ed with the whole state donated: it returns its successor in the same buffers."""
    return jax.pmap(functools.partial(step, trainable=mask, **static), axis_name=axis_name, devices=devices,
                    donate_argnums=(0,))


@functools.lru_cache(maxsize=64)
def _pmapped(step, devices: tuple, trainable=None, pmap_train=None, **static):
    """`step` pmap-ed once per its arguments: a training step by `pmap_train` (the `trainable` mask flattened to be
    hashable), an evaluation step by `jax.pmap`."""
    if pmap_train is None:
        return jax.pmap(functools.partial(step, **static), axis_name=AXIS, devices=list(devices))
    mask = None if trainable is None else jax.tree.unflatten(trainable[1], trainable[0])
    return pmap_train(step, mask, AXIS, list(devices), **static)


class DataParallel:
    """The steps pmap-ed over `devices` (default: all of every process; training ones by `pmap_train`, default
    `target.step_factory()`), and the boundary between host and device arrays: each process passes its own rows."""

    def __init__(self, inputs, trainable=None, devices: Optional[list] = None,
                 options: StepOptions = StepOptions(), pmap_train: Optional[Callable] = None):
        self.devices = list(devices or jax.devices())
        self.n_devices = len(self.devices)
        self.local_rows = [i for i, d in enumerate(self.devices) if d.process_index == jax.process_index()]
        self.sharding = NamedSharding(Mesh(np.array(self.devices), (AXIS,)), PartitionSpec(AXIS))
        key = None if trainable is None else (tuple(jax.tree.leaves(trainable)), jax.tree.structure(trainable))
        train, devices = dict(inputs=inputs, n_devices=self.n_devices, options=options), tuple(self.devices)
        self.train_step, self.train_steps = (_pmapped(step, devices, key, pmap_train or step_factory(), **train)
                                             for step in (train_step, train_steps))
        self.eval_step, self.probabilities_step = (
            _pmapped(eval_step, devices, inputs=inputs, tta_flip=options.tta_flip, probabilities=probabilities)
            for probabilities in (False, True))

    def mine(self, batch: np.ndarray, axis: int = 0) -> np.ndarray:
        """This process's rows of a global batch whose `axis` runs over the devices."""
        return np.take(batch, self.local_rows, axis=axis)

    def replicate(self, tree):
        """Copy a host pytree onto every device of this process (leading axis = devices)."""
        return self.shard(jax.tree.map(lambda x: np.broadcast_to(x, (len(self.local_rows),) + np.shape(x)), tree))

    def shard(self, tree):
        """Place this process's rows (local devices, ...) of a batch on its devices."""
        def put(x):
            shards = [jax.device_put(x[i:i + 1], self.devices[d]) for i, d in enumerate(self.local_rows)]
            return jax.make_array_from_single_device_arrays((self.n_devices,) + x.shape[1:], self.sharding, shards)
        return jax.tree.map(lambda x: put(np.asarray(x)), tree)

    @staticmethod
    def unreplicate(tree):
        """The first local device's copy as numpy; read from the shard, as indexing would dispatch a program that
        can deadlock against a queued collective step on CPU devices."""
        return jax.tree.map(lambda x: np.asarray(x.addressable_data(0))[0], tree)

    def evaluate(self, state, data, n: int, batch_size: int, step=None):
        """`step`'s outputs (default: predicted classes, per-example losses) for examples 0..n-1 of the resident
        `data`, each once, in every process."""
        idx, mask = eval_indices(n, batch_size, self.n_devices)
        outputs = [(step or self.eval_step)(state, data, self.mine(i)) for i in idx]  # all dispatched, then read
        return jax.tree.map(lambda *batches: np.concatenate([b[m] for b, m in zip(batches, mask)]),
                            *[self.unreplicate(o) for o in outputs])

    def probabilities(self, state, images, n: int, batch_size: int) -> np.ndarray:
        """(n, classes) class probabilities of images 0..n-1 of the resident `images`."""
        return self.evaluate(state, (images,), n, batch_size, self.probabilities_step)
