"""Several training steps per call (`Config.steps_per_call`; which steps each call runs: tests/test_schedule.py): the
scan runs the steps of as many single calls, equal within float32 rounding (checked here at the step function,
where a difference cannot hide behind a training loop)."""
import jax
import numpy as np
import pytest

from cifarjax.augment import AugmentSpec, HostAugment
from cifarjax.data import Split
from cifarjax.freezing import Freezing
from cifarjax.inputs import FeatureInputs, HostAugmentedInputs, HostAugmentFeed, ImageInputs
from cifarjax.models import AXIS, Apply, SimpleCNN, initialize
from cifarjax.optim import make_optimizer
from cifarjax.target import step_factory
from cifarjax.train import DataParallel, StepOptions, create_train_state
from tests.test_train import fast, small_resnet, small_resnet_variables, tiny_split


def step_runners(model, variables, inputs, data, platform, trainable=None, config=fast(), options=StepOptions()):
    """(single, scan) on 2 devices, each from the same initial state: `single(idx)` calls `train_step` once per row
    of idx, `scan(idx)` calls `train_steps` once over all rows; each returns (the state after, each step's loss).
    One optimizer and one `DataParallel` serve every call, so each program compiles once."""
    parallel = DataParallel(inputs, trainable, jax.devices()[:2], options, step_factory(platform))
    tx = make_optimizer(config, variables["params"], 10, platform=platform)
    apply = Apply(model, "classify" if isinstance(inputs, FeatureInputs) else None)
    new = lambda: parallel.replicate(create_train_state(  # noqa: E731
        apply, variables, tx, 0, ema=options.ema_decay > 0, freezing=Freezing.from_config(config)))
    resident = parallel.replicate((data.images, data.labels))

    def single(idx):
        state, losses = new(), []
        for i in idx:
            state, metrics = parallel.train_step(state, resident, i)
            losses.append(float(metrics["loss"][0]))
        return parallel.unreplicate(state), losses

    def scan(idx):
        state, metrics = parallel.train_steps(new(), resident, np.swapaxes(idx, 0, 1))
        return parallel.unreplicate(state), list(np.asarray(metrics["loss"][0]))
    return single, scan


def max_difference(a, b) -> float:
    return max(float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64))))
               for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


# Each program rounds each float32 operation to within half a unit in the last place, but XLA compiles a loop's
# body apart and may fuse, so round, differently: after 3 steps the states were at most 2.4e-7 apart (2 units in
# the last place of a BatchNorm variance near 1; values here stay below 2). 2e-6 leaves a margin of 8 over that
# and lies 10,000x below what 3 steps change (0.03-0.2); the same steps in another order differ by 0.02-0.17.
# The optimizer is SGD: Adam divides by the root of the squared gradient, so a gradient that is rounding noise (a
# dead unit's) gets an update of the learning rate's size, and differences of up to the learning rate would say
# nothing about the steps.
ROUNDING = 2e-6


@pytest.mark.parametrize("name", [pytest.param("simple_cnn_dropout_flips", marks=pytest.mark.slow),
                                  "resnet_bn_train_layer4_ema"])
def test_a_rolled_scan_runs_the_steps_of_single_calls(name):
    """The GPU program (built for "gpu", run on the CPU): 3 steps in one scan against 3 calls. A ResNet with flips
    (a key per step), train-mode BatchNorm statistics, frozen layers and a moving average in the carry; SimpleCNN
    with dropout (a key per step and device) too."""
    data = tiny_split(24)
    idx = np.arange(24, dtype=np.int32).reshape(3, 2, 4)
    inputs = ImageInputs(AugmentSpec(flip=True))
    config = fast(optimizer="sgd", lr=0.1)
    if name.startswith("simple_cnn"):
        model, options, trainable = SimpleCNN(3), StepOptions(), None
        variables = initialize(model)
    else:
        model = small_resnet(axis_name=AXIS)
        config = config.replace(model="resnet18", unfreeze="layer4", bn="train")
        variables, options = small_resnet_variables(), StepOptions(ema_decay=0.9)
        trainable = Freezing.from_config(config).trainable_mask(variables["params"])
    single, scan = step_runners(model, variables, inputs, data, "gpu", trainable, config, options)
    (stepped, losses), (scanned, scan_losses) = single(idx), scan(idx)
    assert int(stepped.step) == int(scanned.step) == 3
    assert max_difference(stepped, scanned) < ROUNDING
    np.testing.assert_allclose(scan_losses, losses, rtol=ROUNDING)
    assert max_difference(stepped.params, variables["params"]) > 1e4 * ROUNDING
    reordered, _ = single(idx[::-1])
    assert max_difference(stepped.params, reordered.params) > 1e3 * ROUNDING  # the check sees another order


def test_a_head_on_cached_features_gives_the_same_bits_in_a_rolled_scan_on_a_cpu():
    """The CPU program of a head on cached features (auto runs up to 64 of its steps a call): bit-identical."""
    rng = np.random.default_rng(0)
    data = Split(rng.normal(size=(24, 2, 64)).astype(np.float32), np.arange(24, dtype=np.int32) % 3)
    model = small_resnet(frozen_bn_stages=5, axis_name=AXIS)
    variables = small_resnet_variables()
    config = fast(model="resnet18", unfreeze="head")
    trainable = Freezing.from_config(config).trainable_mask(variables["params"])
    idx = np.arange(24, dtype=np.int32).reshape(3, 2, 4)
    single, scan = step_runners(model, variables, FeatureInputs(AugmentSpec()), data, "cpu", trainable, config)
    (stepped, losses), (scanned, scan_losses) = single(idx), scan(idx)
    for a, b in zip(jax.tree.leaves(stepped), jax.tree.leaves(scanned)):
        np.testing.assert_array_equal(a, b)
    assert scan_losses == losses


def test_host_augmented_steps_packed_in_one_call_are_each_steps_own():
    """Host augmentation (albumentations) of K steps in one call: each step's rows are the images its own call
    would have augmented (the draws of its own step)."""
    data = tiny_split(16)
    parallel = DataParallel(HostAugmentedInputs(AugmentSpec()), None, jax.devices()[:2], pmap_train=step_factory("gpu"))
    feed = HostAugmentFeed(parallel, data, HostAugment(seed=0))
    idx = np.arange(16, dtype=np.int32)[::-1].reshape(2, 2, 4)
    images, rows = feed(idx, 10)
    for s in range(2):
        own, own_rows = feed(idx[s], 10 + s)
        for d in range(2):
            np.testing.assert_array_equal(np.asarray(images[0])[d][rows[s, d]], np.asarray(own[0])[d][own_rows[d]])
            np.testing.assert_array_equal(np.asarray(images[1])[d][rows[s, d]], data.labels[idx[s, d]])
    assert not np.array_equal(np.asarray(feed(idx[0], 10)[0][0]), np.asarray(feed(idx[0], 11)[0][0]))
