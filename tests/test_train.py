import jax
import numpy as np
import optax
import pytest

from cifarjax.augment import AugmentSpec
from cifarjax.config import Config
from cifarjax.data import Split
from cifarjax.errors import UserError
from cifarjax.loop import NonFiniteLossError, build_model, fine_tune_loop, init_variables, train_loop
from cifarjax.models import ResNet18, SimpleCNN
from cifarjax.optim import freeze_labels, make_optimizer
from cifarjax.train import AXIS, DataParallel, ImageInputs, create_train_state


def tiny_split(n, seed=0, classes=3, size=32):
    """Learnable images: each class has its own colour offset."""
    rng = np.random.default_rng(seed)
    labels = (np.arange(n) % classes).astype(np.int32)
    images = rng.integers(0, 96, (n, size, size, 3)) + 70 * labels[:, None, None, None]
    return Split(images.astype(np.uint8), labels)


def run_steps(model, variables, data, steps, n_devices, unfreeze="all", batch=8, seed=0, tx=None):
    devices = jax.local_devices()[:n_devices]
    labels = freeze_labels(variables["params"], unfreeze)
    tx = tx or make_optimizer(variables["params"], 1e-3, unfreeze)
    parallel = DataParallel(ImageInputs(AugmentSpec()), labels if unfreeze != "all" else None, devices)
    state = parallel.replicate(create_train_state(model.apply, variables, tx, seed))
    resident = parallel.replicate((data.images, data.labels))
    for s in range(steps):
        idx = (np.arange(batch) + s * batch) % len(data)
        state, metrics = parallel.train_step(state, resident, idx.reshape(n_devices, -1).astype(np.int32))
    return parallel.unreplicate(state), metrics


def assert_trees_close(a, b, atol):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(x, y, atol=atol, rtol=0)


@pytest.mark.parametrize("optimizer,atol", [("sgd", 1e-6), ("adam", 1e-5)])
def test_two_devices_equal_one_device_simple_cnn(optimizer, atol):
    """The same global batches give the same parameters on 2 devices as on 1 (augmentation included).

    SGD shows the parallel step itself agrees to 1e-6. Adam divides by |g| + 1e-8, so for gradients near
    zero the float rounding of two half-batch sums vs one full-batch sum (~1e-12) becomes an update
    difference of up to ~lr * 1e-3; its bound is therefore 1e-5.
    """
    assert jax.local_device_count() >= 2, "tests run with two simulated CPU devices (see conftest.py)"
    model = SimpleCNN(3, dropout_rate=0.0)
    variables = jax.device_get(model.init(jax.random.PRNGKey(0), np.zeros((1, 32, 32, 3), np.float32)))
    data = tiny_split(32)
    tx = optax.sgd(0.05) if optimizer == "sgd" else None
    one, m1 = run_steps(model, variables, data, 4, 1, tx=tx)
    two, m2 = run_steps(model, variables, data, 4, 2, tx=tx)
    assert_trees_close(one.params, two.params, atol)
    assert not np.allclose(one.params["conv2"]["kernel"], variables["params"]["conv2"]["kernel"], atol=atol * 10)
    np.testing.assert_allclose(m1["loss"][0], m2["loss"][0], rtol=1e-5)


@pytest.mark.parametrize("steps,lr,atol", [(1, 0.05, 1e-6), (3, 1e-3, 1e-5)])
def test_two_devices_equal_one_device_resnet_with_synchronised_batchnorm(steps, lr, atol):
    """Train-mode BatchNorm statistics are computed over the global batch, so 2 devices match 1.

    Rounding differences grow through 20 train-mode BatchNorms normalising layer4's 1x1 maps over only
    16 values, hence the looser bound over several steps.
    """
    model = ResNet18(3, axis_name=AXIS)
    variables = jax.device_get(model.init(jax.random.PRNGKey(0), np.zeros((1, 32, 32, 3), np.float32)))
    data = tiny_split(16)
    one, _ = run_steps(model, variables, data, steps, 1, tx=optax.sgd(lr), batch=16)
    two, _ = run_steps(model, variables, data, steps, 2, tx=optax.sgd(lr), batch=16)
    assert_trees_close(one.params, two.params, atol)
    assert_trees_close(one.batch_stats, two.batch_stats, atol)
    assert not np.allclose(one.batch_stats["backbone"]["bn1"]["mean"], variables["batch_stats"]["backbone"]["bn1"]["mean"])


@pytest.mark.parametrize("unfreeze,bn_frozen_stages", [("head", 5), ("layer4", 4)])
def test_frozen_parameters_and_statistics_stay_bit_identical(unfreeze, bn_frozen_stages):
    model = ResNet18(3, frozen_bn_stages=bn_frozen_stages, axis_name=AXIS)
    variables = jax.device_get(model.init(jax.random.PRNGKey(0), np.zeros((1, 32, 32, 3), np.float32)))
    after, _ = run_steps(model, variables, tiny_split(16), 3, 2, unfreeze=unfreeze)
    labels = freeze_labels(variables["params"], unfreeze)
    flat_labels = jax.tree_util.tree_leaves_with_path(labels)
    for (path, label), old, new in zip(flat_labels, jax.tree.leaves(variables["params"]),
                                       jax.tree.leaves(after.params)):
        if label == "frozen":
            np.testing.assert_array_equal(old, new, err_msg=jax.tree_util.keystr(path))
    assert not np.array_equal(variables["params"]["head"]["kernel"], after.params["head"]["kernel"])
    for stage in ("bn1", "layer1_block0", "layer3_block1"):
        for old, new in zip(jax.tree.leaves(variables["batch_stats"]["backbone"][stage]),
                            jax.tree.leaves(after.batch_stats["backbone"][stage])):
            np.testing.assert_array_equal(old, new)
    layer4_changed = not np.array_equal(variables["params"]["backbone"]["layer4_block1"]["conv2"]["kernel"],
                                        after.params["backbone"]["layer4_block1"]["conv2"]["kernel"])
    assert layer4_changed == (unfreeze == "layer4")


def test_frozen_parameters_get_no_optimizer_state():
    variables = jax.eval_shape(lambda: ResNet18(10).init(jax.random.PRNGKey(0), np.zeros((1, 32, 32, 3))))
    state = jax.eval_shape(make_optimizer(variables["params"], 1e-3, "head").init, variables["params"])
    sizes = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state))
    assert sizes == 2 * (512 * 10 + 10) + 1  # Adam's mu and nu for the head, and its step count


def test_frozen_step_skips_the_backbone_backward_pass():
    """With only the head trainable, XLA must drop the backbone's gradient: the compiled step holds no
    more convolutions than the forward pass (ResNet-18 has 20)."""
    config = Config(model="resnet18", unfreeze="head", conv_impl="xla")
    model = build_model(config)
    variables = init_variables(model, config)
    labels = freeze_labels(variables["params"], "head")
    parallel = DataParallel(ImageInputs(AugmentSpec()), labels, jax.local_devices()[:1])
    state = parallel.replicate(create_train_state(model.apply, variables, make_optimizer(
        variables["params"], 1e-3, "head"), 0))
    data = tiny_split(8)
    resident = parallel.replicate((data.images, data.labels))
    hlo = parallel.train_step.lower(state, resident, np.zeros((1, 8), np.int32)).compile().as_text()
    assert hlo.count(" convolution(") == 20
    unfrozen = DataParallel(ImageInputs(AugmentSpec()), None, jax.local_devices()[:1])
    full_state = unfrozen.replicate(create_train_state(model.apply, variables, make_optimizer(
        variables["params"], 1e-3, "all"), 0))
    full = unfrozen.train_step.lower(full_state, resident, np.zeros((1, 8), np.int32)).compile().as_text()
    assert full.count(" convolution(") > 50


def test_memorises_a_tiny_set():
    data = tiny_split(64, classes=4)
    config = Config(n_epochs=30, batch_size=16, lr=1e-3, eval_every=0, num_classes=4)
    result = train_loop(config, data, data)
    assert result.history.epoch_val_accuracy[-1] == 1.0


def test_same_seed_same_numbers_bit_for_bit():
    data, val = tiny_split(48), tiny_split(12, seed=1)
    config = Config(n_epochs=2, batch_size=8, eval_every=3, num_classes=3)
    a, b = train_loop(config, data, val), train_loop(config, data, val)
    assert a.history.records == [dict(r, wall_seconds=x["wall_seconds"]) for r, x in
                                 zip(b.history.records, a.history.records)]
    for x, y in zip(jax.tree.leaves(a.variables), jax.tree.leaves(b.variables)):
        np.testing.assert_array_equal(x, y)
    c = train_loop(Config(n_epochs=2, batch_size=8, eval_every=3, num_classes=3, seed=1), data, val)
    assert a.history.train_loss != c.history.train_loss


def test_history_has_the_originals_positions():
    data = tiny_split(40)
    result = train_loop(Config(n_epochs=2, batch_size=8, eval_every=3, num_classes=3), data, data)
    h = result.history
    assert len(h.train_loss) == 2 and len(h.train_accuracy) == 2 and len(h.epoch_val_accuracy) == 2
    # 5 steps per epoch: evaluations at steps 3, 5 (epoch end), 6, 9, 10 (epoch end)
    assert [r["step"] for r in h.records] == [3, 5, 6, 9, 10]
    assert h.val_epoch == [0.6, 1.0, 1.2, 1.8, 2.0]


def test_non_finite_loss_stops_with_the_step(tmp_path):
    data = tiny_split(32)
    config = Config(n_epochs=3, batch_size=8, lr=1e30, eval_every=0, num_classes=3)
    with pytest.raises(NonFiniteLossError, match=r"training loss became nan at step \d+"):
        train_loop(config, data, data, run=tmp_path)
    assert isinstance(NonFiniteLossError("x"), UserError)


def test_cached_features_follow_the_same_curve_as_the_image_path():
    data, val = tiny_split(48), tiny_split(16, seed=1)
    config = Config(model="resnet18", unfreeze="head", num_classes=3, n_epochs=3, batch_size=8, eval_every=0)
    variables = init_variables(build_model(config), config)
    cached = fine_tune_loop(config, variables, data, val)
    Config_uncached = Config(**{**config.__dict__, "cache_features": False})
    plain = fine_tune_loop(Config_uncached, variables, data, val)
    np.testing.assert_allclose(cached.history.train_loss, plain.history.train_loss, rtol=1e-4)
    assert cached.history.epoch_val_accuracy == plain.history.epoch_val_accuracy
    np.testing.assert_allclose(cached.variables["params"]["head"]["kernel"],
                               plain.variables["params"]["head"]["kernel"], atol=1e-5)


def test_albumentations_host_pipeline_trains():
    data = tiny_split(32)
    config = Config(n_epochs=2, batch_size=8, eval_every=0, num_classes=3, augment_backend="albumentations")
    result = train_loop(config, data, data)
    assert len(result.history.train_loss) == 2 and all(np.isfinite(result.history.train_loss))
    again = train_loop(config, data, data)
    assert again.history.train_loss == result.history.train_loss
