import contextlib
import threading

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cifarjax.augment import AugmentSpec, HostAugment
from cifarjax.config import Config
from cifarjax.data import Split, train_indices
from cifarjax.errors import UserError
from cifarjax.freezing import Freezing
from cifarjax.inputs import FeatureInputs, HostAugmentedInputs, ImageInputs, backbone_features, cacheable
from cifarjax.loop import HostAugmentFeed, NonFiniteLossError, fit, train_loop
from cifarjax.schedule import CHEAP_STEPS_PER_CALL, Call, steps_per_call
from cifarjax.models import AXIS, Apply, ResNet, ResNet18, initialize
from cifarjax.optim import base_optimizer, make_optimizer
from cifarjax.train import DataParallel, create_train_state


def fast(**changes) -> Config:
    """The tests' training config: XLA's convolution compiles 5x faster than the fused CPU blocks, whose
    equivalence tests/test_models.py checks; loop behaviour does not depend on the formulation."""
    return Config(**{"batch_size": 8, "num_classes": 3, "eval_every": 0, "conv_impl": "xla", "checkpoint_seconds": 0,
                     **changes})


def small_resnet(**kw):
    """A ResNet with ResNet-18's stages, one block each, 8 filters wide: the properties of stages, BatchNorm and
    freezing hold for any width, and it compiles in a fraction of ResNet-18's time."""
    return ResNet(3, stage_sizes=(1, 1, 1, 1), num_filters=8, **kw)


def small_resnet_variables() -> dict:
    """`small_resnet`'s initial variables, the same whatever its frozen BatchNorm stages: every test shares one
    compiled `init` (about 12 s of CPU time each)."""
    return initialize(small_resnet(axis_name=AXIS))


def two_stage_variables(variables: dict) -> dict:
    """Variables for `small_resnet`'s first two stages alone (`ResNet(3, stage_sizes=(1, 1), num_filters=8)`):
    its stem's and first two blocks', and the first 16 of its head's 64 input rows (the two-stage net's features).
    Not that net's own `init`, whose compilation costs about 6 s of CPU time; a test of the same computation on one
    device and on two holds from any starting values."""
    def first_two(collection):
        backbone = {k: v for k, v in collection["backbone"].items() if not k.startswith(("layer3", "layer4"))}
        return {"backbone": backbone, **{k: v for k, v in collection.items() if k != "backbone"}}
    params = first_two(variables["params"])
    params["head"] = {**params["head"], "kernel": params["head"]["kernel"][:16]}
    return {"params": params, "batch_stats": first_two(variables["batch_stats"])}


def tiny_split(n, seed=0, classes=3, size=32):
    """Learnable images: each class has its own colour offset."""
    rng = np.random.default_rng(seed)
    labels = (np.arange(n) % classes).astype(np.int32)
    images = rng.integers(0, 96, (n, size, size, 3)) + 70 * labels[:, None, None, None]
    return Split(images.astype(np.uint8), labels)


def run_steps(model, variables, data, steps, n_devices, unfreeze="all", batch=8, seed=0, tx=None, text=True):
    """`steps` training steps on `n_devices`: the state (unreplicated), the last metrics, the compiled step's text
    (None unless `text`: lowering and compiling it again costs CPU time)."""
    devices = jax.local_devices()[:n_devices]
    config = Config(model="resnet18" if unfreeze != "all" else "simple_cnn", unfreeze=unfreeze)
    trainable = Freezing.from_config(config).trainable_mask(variables["params"])
    tx = tx or make_optimizer(config, variables["params"])
    parallel = DataParallel(ImageInputs(AugmentSpec()), trainable if unfreeze != "all" else None, devices)
    state = parallel.replicate(create_train_state(model.apply, variables, tx, seed))
    resident = parallel.replicate((data.images, data.labels))
    # The text of the program the steps ran: the same program again, from the persistent compilation cache.
    program = parallel.train_step.lower(state, resident, np.zeros((n_devices, batch // n_devices), np.int32)) \
        if text else None
    for s in range(steps):
        idx = (np.arange(batch) + s * batch) % len(data)
        state, metrics = parallel.train_step(state, resident, idx.reshape(n_devices, -1).astype(np.int32))
    return parallel.unreplicate(state), metrics, program.compile().as_text() if text else None


def assert_trees_close(a, b, atol):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(x, y, atol=atol, rtol=0)


def float64(tree):
    return jax.tree.map(lambda x: np.asarray(x, np.float64), tree)


# The 1-vs-2-device tests check an algorithmic claim (the same global batch, the same global BatchNorm
# statistics, the same update), so they run in float64. There, summing a batch in two halves rather than one
# changes results by ~1e-16 relative; Adam's division by |g| + eps and train-mode BatchNorms over 16 values
# amplify it (to ~3e-13 as measured on deeper nets; 3e-16 through this test's six, measured 2026-12-08), so 1e-9
# holds on any CPU with a margin of over 1e3, while a real difference in the algorithm shows up far above it
# (per-device BatchNorm statistics: 0.04 in the statistics, 0.006 in the parameters after 3 steps of the two-stage
# net). In float32 the same rounding is ~1e-7, and how far it grows depends on the CPU's summation order (AVX2 vs
# AVX-512).
ALGORITHM_ATOL = 1e-9


def test_two_devices_equal_one_device_resnet_with_synchronised_batchnorm():
    """The same global batches give the same parameters, loss and train-mode BatchNorm statistics (computed over
    the global batch) on 2 devices as on 1, augmentation and the default optimizer (Adam) included."""
    assert jax.local_device_count() >= 2, "tests run with two simulated CPU devices (see conftest.py)"
    model = ResNet(3, stage_sizes=(1, 1), num_filters=8, axis_name=AXIS)  # a stem, a block, one that downsamples
    data = tiny_split(16)
    with jax.enable_x64(True):
        variables = float64(two_stage_variables(small_resnet_variables()))
        one, m1, _ = run_steps(model, variables, data, 3, 1, batch=16, text=False)
        two, m2, _ = run_steps(model, variables, data, 3, 2, batch=16, text=False)
    assert one.params["head"]["kernel"].dtype == np.float64
    assert_trees_close(one.params, two.params, ALGORITHM_ATOL)
    assert not np.allclose(one.params["head"]["kernel"], variables["params"]["head"]["kernel"], atol=1e-4)
    np.testing.assert_allclose(m1["loss"][0], m2["loss"][0], rtol=1e-12)
    assert_trees_close(one.batch_stats, two.batch_stats, ALGORITHM_ATOL)
    bn1_mean = variables["batch_stats"]["backbone"]["bn1"]["mean"]
    assert not np.allclose(one.batch_stats["backbone"]["bn1"]["mean"], bn1_mean)


@pytest.mark.parametrize("unfreeze,bn_frozen_stages", [("head", 5), ("layer4", 4)])
def test_frozen_parameters_and_statistics_stay_bit_identical(unfreeze, bn_frozen_stages):
    """Frozen parameters and BatchNorm statistics keep their bits, and XLA drops the frozen layers' backward pass:
    with only the head trainable the compiled step holds no more convolutions than the forward pass has kernels
    (with layer4 trainable it holds more: the count sees backward convolutions)."""
    model = small_resnet(frozen_bn_stages=bn_frozen_stages, axis_name=AXIS)
    variables = small_resnet_variables()
    after, _, program = run_steps(model, variables, tiny_split(16), 3, 2, unfreeze=unfreeze)
    kernels, convolutions = sum(leaf.ndim == 4 for leaf in jax.tree.leaves(variables["params"])), \
        program.count(" convolution(")
    assert kernels == 12 and (convolutions == kernels if unfreeze == "head" else convolutions > kernels)
    mask = Freezing.from_config(Config(model="resnet18", unfreeze=unfreeze)).trainable_mask(variables["params"])
    flat_mask = jax.tree_util.tree_leaves_with_path(mask)
    for (path, trains), old, new in zip(flat_mask, jax.tree.leaves(variables["params"]),
                                        jax.tree.leaves(after.params)):
        if not trains:
            np.testing.assert_array_equal(old, new, err_msg=jax.tree_util.keystr(path))
    assert not np.array_equal(variables["params"]["head"]["kernel"], after.params["head"]["kernel"])
    for stage in ("bn1", "layer1_block0", "layer3_block0"):
        for old, new in zip(jax.tree.leaves(variables["batch_stats"]["backbone"][stage]),
                            jax.tree.leaves(after.batch_stats["backbone"][stage])):
            np.testing.assert_array_equal(old, new)
    layer4_changed = not np.array_equal(variables["params"]["backbone"]["layer4_block0"]["conv2"]["kernel"],
                                        after.params["backbone"]["layer4_block0"]["conv2"]["kernel"])
    assert layer4_changed == (unfreeze == "layer4")


def test_frozen_parameters_get_no_optimizer_state():
    variables = jax.eval_shape(lambda: ResNet18(10).init(jax.random.PRNGKey(0), np.zeros((1, 32, 32, 3))))
    config = Config(model="resnet18", unfreeze="head")
    state = jax.eval_shape(make_optimizer(config, variables["params"]).init, variables["params"])
    sizes = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state))
    assert sizes == 2 * (512 * 10 + 10) + 1  # Adam's mu and nu for the head, and its step count


@pytest.mark.parametrize("name", ["adam", "adamw", "sgd"])
def test_optimizers_equal_optax_bit_for_bit(name, rng):
    """cifarjax's Adam and Nesterov momentum only move a fusion boundary: the same arithmetic in the same order,
    so jitted updates and states equal optax's exactly, and checkpoints keep optax's state structure."""
    config = Config(optimizer=name, lr=1e-2, weight_decay=5e-4 if name != "adam" else 0.0)
    params = {"kernel": jnp.asarray(rng.normal(size=(3, 3, 4, 8)), jnp.float32), "bias": jnp.zeros(8)}
    if name == "adam":
        reference = optax.adam(1e-2)
    elif name == "adamw":
        reference = optax.adamw(1e-2, weight_decay=5e-4, mask=lambda p: jax.tree.map(lambda x: x.ndim > 1, p))
    else:
        reference = optax.chain(optax.add_decayed_weights(5e-4, lambda p: jax.tree.map(lambda x: x.ndim > 1, p)),
                                optax.sgd(1e-2, momentum=config.momentum, nesterov=True))
    ours = base_optimizer(config, 1, platform="cpu")
    states = [tx.init(params) for tx in (ours, reference)]
    assert jax.tree.structure(states[0]) == jax.tree.structure(states[1])
    for _ in range(3):
        grads = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32), params)
        (u0, states[0]), (u1, states[1]) = [jax.jit(tx.update)(grads, s, params) for tx, s in zip((ours, reference),
                                                                                                    states)]
        for a, b in zip(jax.tree.leaves((u0, states[0])), jax.tree.leaves((u1, states[1]))):
            np.testing.assert_array_equal(a, b)
        params = optax.apply_updates(params, u0)


def test_memorises_a_tiny_set():
    data = tiny_split(40)
    result = train_loop(fast(n_epochs=6), data, data)  # all right from the second epoch on
    assert result.history.epoch_val_accuracy[-1] == 1.0


TWO_EPOCHS = fast(n_epochs=2, eval_every=3)


@pytest.fixture(scope="module")
def two_epochs():
    """Two epochs of 40 images with evaluations every 3 steps (shared: a run is deterministic, as tested)."""
    return train_loop(TWO_EPOCHS, tiny_split(40), tiny_split(12, seed=1))


def test_same_seed_same_numbers_bit_for_bit(two_epochs):
    data, val = tiny_split(40), tiny_split(12, seed=1)
    config = TWO_EPOCHS
    a, b = two_epochs, train_loop(config, data, val)
    assert a.history.records == [dict(r, wall_seconds=x["wall_seconds"]) for r, x in
                                 zip(b.history.records, a.history.records)]
    for x, y in zip(jax.tree.leaves(a.variables), jax.tree.leaves(b.variables)):
        np.testing.assert_array_equal(x, y)
    c = train_loop(config.replace(seed=1), data, val)
    assert a.history.train_loss != c.history.train_loss


def test_history_has_the_originals_positions(two_epochs):
    h = two_epochs.history
    assert len(h.train_loss) == 2 and len(h.train_accuracy) == 2 and len(h.epoch_val_accuracy) == 2
    # 5 steps per epoch: evaluations at steps 3, 5 (epoch end), 6, 9, 10 (epoch end)
    assert [r["step"] for r in h.records] == [3, 5, 6, 9, 10]
    assert h.val_epoch == [0.6, 1.0, 1.2, 1.8, 2.0]


def test_non_finite_loss_stops_with_the_step(tmp_path):
    with pytest.raises(NonFiniteLossError, match=r"training loss became nan at step \d+"):
        train_loop(fast(n_epochs=3, lr=1e30), tiny_split(40), tiny_split(12, seed=1), run=tmp_path)
    assert isinstance(NonFiniteLossError("x"), UserError)


def test_cached_features_follow_the_same_curve_as_the_image_path():
    """The same flips, the same features, the same head updates: an algorithmic claim, checked in float64
    (the two paths run the backbone at different batch sizes, whose float32 rounding Adam can amplify in a
    CPU-dependent way; see ALGORITHM_ATOL)."""
    data, val = tiny_split(48), tiny_split(16, seed=1)
    config = fast(model="resnet18", unfreeze="head", n_epochs=3)
    model = small_resnet(frozen_bn_stages=5, axis_name=AXIS)
    with jax.enable_x64(True):
        variables = float64(small_resnet_variables())
        spec = AugmentSpec.from_config(config)
        features = backbone_features(config, model, variables, data, val)
        cached = fit(config, Apply(model, "classify"), variables, *features, FeatureInputs(spec))
        plain = fit(config, Apply(model), variables, data, val, ImageInputs(spec))
    np.testing.assert_allclose(cached.history.train_loss, plain.history.train_loss, rtol=ALGORITHM_ATOL)
    assert cached.history.epoch_val_accuracy == plain.history.epoch_val_accuracy
    assert_trees_close(cached.variables["params"]["head"], plain.variables["params"]["head"], ALGORITHM_ATOL)
    assert not np.allclose(cached.variables["params"]["head"]["kernel"], variables["params"]["head"]["kernel"])
    assert cacheable(config) and not cacheable(config.replace(crop_padding=2)) and \
        not cacheable(config.replace(bn="train")) and not cacheable(config.replace(unfreeze="layer4"))


def test_albumentations_host_pipeline_trains(monkeypatch):
    """Trains, and the same run gives the same numbers whether the host prepares batches ahead or not."""
    data = tiny_split(40)
    config = fast(n_epochs=2, augment_backend="albumentations")
    result = train_loop(config, data, data)
    assert len(result.history.train_loss) == 2 and all(np.isfinite(result.history.train_loss))
    monkeypatch.setattr(HostAugmentFeed, "DEPTH", 0)  # each batch prepared only when its step asks
    again = train_loop(config, data, data)
    assert again.history.train_loss == result.history.train_loss


def host_augment_threads() -> list:
    return [t for t in threading.enumerate() if t.name.startswith("host-augment")]


def test_host_batches_are_prepared_ahead_in_order_and_stop_with_the_loop():
    """`ahead` passes the calls through unchanged while a background thread prepares the next ones: each batch is
    exactly the one prepared when asked for; an error in preparing reaches the loop, and the thread ends when the
    loop ends, fails or is interrupted."""
    data = tiny_split(32)
    parallel = DataParallel(HostAugmentedInputs(AugmentSpec()), devices=jax.local_devices()[:2])
    feed = HostAugmentFeed(parallel, data, HostAugment(seed=0))
    epoch = train_indices(len(data), 8, 2, 0, 0)
    calls = [(Call(0), epoch[0]), (Call(1, 2), epoch[1:3]), (Call(3), epoch[3])]  # one step, two in a call, one
    seen = []
    with contextlib.closing(feed.ahead(iter(calls))) as batches:
        for call, idx in batches:
            first, end = call.first, call.end
            assert first in feed.prepared and len(feed.prepared) <= 1 + HostAugmentFeed.DEPTH
            (images, labels), rows = feed(idx, first)
            (want_images, want_labels), want_rows = feed.prepare(idx, first)
            np.testing.assert_array_equal(images, want_images)
            np.testing.assert_array_equal(labels, want_labels)
            np.testing.assert_array_equal(rows, want_rows)
            assert images.dtype == np.uint8
            seen.append(end)
    assert seen == [1, 3, 4] and not feed.prepared and not host_augment_threads()

    def fails(idx, step):
        raise OSError("disk gone")
    feed.prepare = fails
    with pytest.raises(OSError, match="disk gone"), contextlib.closing(feed.ahead(iter(calls))) as batches:
        for call, idx in batches:
            feed(idx, call.first)
    assert not host_augment_threads()
    with pytest.raises(KeyboardInterrupt), contextlib.closing(feed.ahead(iter(calls))) as batches:
        for _ in batches:
            raise KeyboardInterrupt
    assert not host_augment_threads()


def test_freed_compiler_memory_is_returned_after_each_compilation(monkeypatch):
    """The commands hand glibc's free heap back after every XLA compilation (on glibc; elsewhere a no-op)."""
    import cifarjax.cpu.process as memory
    if not memory.trim_after_compiling():
        pytest.skip("not glibc")
    calls = []
    monkeypatch.setattr(memory._libc, "malloc_trim", lambda pad: calls.append(pad))
    assert memory.trim_after_compiling()  # idempotent: one listener
    jax.jit(lambda x: x * 3.25 + 1.0)(np.arange(7.0)).block_until_ready()  # a program no test compiled before
    assert calls == [0]


def test_the_progress_bar_reaches_its_total_when_calls_run_several_steps(monkeypatch):
    """Cheap steps (a head on cached features) go several per call: the bar must count steps, not calls (it
    stopped at 4%, 42% and 52% of the fine-tunes with an ETA still showing)."""
    import cifarjax.hooks
    closed = []

    class Bar(cifarjax.hooks.tqdm):
        def close(self):
            closed.append((self.n, self.total))
            super().close()
    monkeypatch.setattr(cifarjax.hooks, "tqdm", Bar)
    config = fast(model="resnet18", unfreeze="head", n_epochs=3, batch_size=4)  # 12 steps per epoch
    model = small_resnet(frozen_bn_stages=5, axis_name=AXIS)
    variables = small_resnet_variables()
    rng = np.random.default_rng(0)
    features = [Split(rng.normal(size=(n, 2, 64)).astype(np.float32), np.arange(n, dtype=np.int32) % 3)
                for n in (48, 16)]  # the head alone trains on (N, views, 64) features: no backbone to compile
    fit(config, Apply(model, "classify"), variables, *features, FeatureInputs(AugmentSpec.from_config(config)))
    assert steps_per_call(CHEAP_STEPS_PER_CALL, 0, (12,)) > 1 and set(closed) == {(36, 36)}
