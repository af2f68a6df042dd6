"""The per-device training step is also correct under `jax.jit(jax.shard_map(...))`, where JAX's multi-device
programs are heading (the project keeps `jax.pmap`): on the 2 simulated CPU devices both give bit-identical
parameters after a couple of steps.

The trap: with `check_vma=True` (shard_map's default) JAX tracks which values vary over the device axis; the
parameters enter replicated, so the transpose of their implicit broadcast already sums the gradients over the
devices, and the step's explicit `lax.pmean` then averages identical sums: the gradient is N times the mean (2x
here), silently (Adam all but hides it: its update is nearly scale-invariant). The step is written for pmap's
semantics (per-device gradients, averaged by hand), so it runs with `check_vma=False`. (With `check_vma=True`
SimpleCNN does not even trace on a CPU: its hand-written VJPs, such as `layers.dense_transposed_backward`, return
gradients that vary over the devices for parameters that do not; the trap is shown on a linear model.)
"""
import functools

import flax.linen as nn
import jax
import numpy as np
import pytest
from jax.sharding import Mesh, PartitionSpec as P

from cifarjax.augment import AugmentSpec
from cifarjax.inputs import ImageInputs
from cifarjax.models import AXIS, build_model, initialize
from cifarjax.optim import make_optimizer
from cifarjax.train import DataParallel, create_train_state, train_step
from tests.test_train import fast, tiny_split

STEPS, BATCH = 2, 8


class Linear(nn.Module):
    """Logits linear in the pixels, through flax's own Dense (no hand-written VJP)."""
    @nn.compact
    def __call__(self, x, train: bool = False):
        return nn.Dense(3)(x.reshape(x.shape[0], -1))


def train(config, check_vma=None, steps=STEPS, model=None):
    """(initial parameters, parameters after `steps` steps, last metrics): by pmap (`check_vma` None) or by
    jit(shard_map) over the same 2 devices, the same batches; `model` defaults to the config's."""
    model, devices, data = model or build_model(config), jax.devices()[:2], tiny_split(32)
    variables = initialize(model)
    state = create_train_state(model.apply, variables, make_optimizer(config, variables["params"]), config.seed)
    inputs = ImageInputs(AugmentSpec.from_config(config))
    batches = [((np.arange(BATCH) + s * BATCH) % len(data)).reshape(2, -1).astype(np.int32) for s in range(steps)]
    if check_vma is None:
        parallel = DataParallel(inputs, devices=devices)
        state, resident = parallel.replicate(state), parallel.replicate((data.images, data.labels))
        for idx in batches:
            state, metrics = parallel.train_step(state, resident, idx)
        return variables["params"], parallel.unreplicate(state).params, parallel.unreplicate(metrics)
    step = functools.partial(train_step, inputs=inputs, n_devices=2)
    sharded = jax.jit(jax.shard_map(lambda state, data, idx: step(state, data, idx[0]),
                                    mesh=Mesh(np.array(devices), (AXIS,)), in_specs=(P(), P(), P(AXIS)),
                                    out_specs=(P(), P()), check_vma=check_vma))
    for idx in batches:
        state, metrics = sharded(state, (data.images, data.labels), idx)
    return variables["params"], jax.device_get(state.params), jax.device_get(metrics)


def test_pmap_and_shard_map_train_the_same_bits():
    config = fast()  # Adam, dropout and flips on: the device index and the pmean all matter
    _, pmapped, pmap_metrics = train(config)
    _, sharded, shard_metrics = train(config, check_vma=False)
    for a, b in zip(jax.tree.leaves(pmapped), jax.tree.leaves(sharded)):
        np.testing.assert_array_equal(a, b)
    assert pmap_metrics == shard_metrics


def test_check_vma_would_double_the_gradient():
    """SGD's update is linear in the gradient: with `check_vma=True` it is twice pmap's (with False, the same bits)."""
    config = fast(optimizer="sgd", momentum=0.0)
    start, pmapped, _ = train(config, steps=1, model=Linear())
    _, sharded, _ = train(config, check_vma=False, steps=1, model=Linear())
    _, doubled, _ = train(config, check_vma=True, steps=1, model=Linear())
    for a, b in zip(jax.tree.leaves(pmapped), jax.tree.leaves(sharded)):
        np.testing.assert_array_equal(a, b)
    for p0, right, wrong in zip(jax.tree.leaves(start), jax.tree.leaves(pmapped), jax.tree.leaves(doubled)):
        ratio = np.max(np.abs(wrong - p0)) / np.max(np.abs(right - p0))
        assert ratio == pytest.approx(2.0, rel=1e-2)  # up to the rounding of p0 - lr * g
