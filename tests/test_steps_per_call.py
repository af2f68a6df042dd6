"""Several training steps per call (`Config.steps_per_call`, one `lax.scan` per dispatch) give the bits of one step
per call, and a call never crosses an evaluation, a checkpoint or an epoch end."""
from types import SimpleNamespace

import jax
import numpy as np
import pytest

from cifarjax.augment import AugmentSpec
from cifarjax.features import backbone_features
from cifarjax.inputs import FeatureInputs
from cifarjax.loop import ACCELERATOR_STEPS_PER_CALL, Trainer, fit, steps_per_call, train_loop
from cifarjax.models import AXIS, Apply, initialize
from tests.test_train import fast, small_resnet, tiny_split


def schedule(config, n_train: int, chunk: int, start: int = 0):
    """[(last step, steps)] of each call `Trainer.batches` makes."""
    fake = SimpleNamespace(state=SimpleNamespace(step=start), steps_per_epoch=n_train // config.batch_size,
                           chunk=chunk, config=config, train=range(n_train), parallel=SimpleNamespace(n_devices=2))
    fake.next_event = lambda step: Trainer.next_event(fake, step)
    return [(end, 1 if idx.ndim == 2 else len(idx)) for end, idx in Trainer.batches(fake)]


def test_calls_fill_up_to_each_event_and_the_remainder_goes_one_step_at_a_time():
    config = fast(n_epochs=2, eval_every=4, checkpoint_every=0)  # 5 steps per epoch: events at 4, 5, 8, 10
    assert schedule(config, 40, 3) == [(3, 3), (4, 1), (5, 1), (8, 3), (9, 1), (10, 1)]
    assert schedule(config, 40, 1) == [(s, 1) for s in range(1, 11)]
    assert schedule(config.replace(eval_every=0, checkpoint_every=3), 40, 2, start=6) == [(8, 2), (9, 1), (10, 1)]


def test_auto_is_one_step_on_a_cpu_and_several_elsewhere():
    config = fast()
    assert steps_per_call(config, 625, "cpu", cheap=False) == 1
    assert steps_per_call(config, 625, "gpu", cheap=False) == ACCELERATOR_STEPS_PER_CALL > 1
    assert steps_per_call(config, 625, "cpu", cheap=True) == 25  # cached features: `cheap_chunk`, as before
    assert steps_per_call(config.replace(steps_per_call=3), 625, "cpu", cheap=False) == 3


@pytest.mark.parametrize("augment", ["device", "albumentations"])
def test_three_steps_per_call_give_the_bits_of_one(augment):
    """SimpleCNN on the 2 simulated devices, dropout and flips on: 5 steps per epoch, an evaluation every 4, so the
    calls are scans of 3 steps and single-step remainders (see the schedule above)."""
    data, val = tiny_split(40), tiny_split(8, seed=1)
    runs = {k: train_loop(fast(n_epochs=2, eval_every=4, steps_per_call=k, augment_backend=augment), data, val)
            for k in (1, 3)}
    one, three = runs[1], runs[3]
    assert len(jax.devices()) == 2
    for a, b in zip(jax.tree.leaves(one.variables), jax.tree.leaves(three.variables)):
        np.testing.assert_array_equal(a, b)
    assert [{k: v for k, v in r.items() if k != "wall_seconds"} for r in one.history.records] == \
        [{k: v for k, v in r.items() if k != "wall_seconds"} for r in three.history.records]
    assert [r["step"] for r in three.history.records] == [4, 5, 8, 10]
    # Each program's first call is compilation: the first scan (steps 1-3) and the first single step (step 4).
    assert one.this_process["compile_images"] == 1 * 8 and three.this_process["compile_images"] == (3 + 1) * 8


def test_a_head_on_cached_features_gives_the_same_bits_in_a_rolled_loop():
    """Cheap steps (no convolution) stay in a rolled loop (one compilation for any number of steps): 5 per call
    (auto, `cheap_chunk`) against one."""
    data, val = tiny_split(40), tiny_split(8, seed=1)
    config = fast(model="resnet18", unfreeze="head", n_epochs=2)
    model = small_resnet(frozen_bn_stages=5, axis_name=AXIS)
    variables = initialize(model)
    features = backbone_features(config, model, variables, data, val)
    spec = AugmentSpec.from_config(config)
    runs = {k: fit(config.replace(steps_per_call=k), Apply(model, "classify"), variables, *features, FeatureInputs(spec))
            for k in (0, 1)}
    assert steps_per_call(config, 5, "cpu", cheap=True) == 5
    for a, b in zip(jax.tree.leaves(runs[0].variables), jax.tree.leaves(runs[1].variables)):
        np.testing.assert_array_equal(a, b)
    assert runs[0].history.train_loss == runs[1].history.train_loss
