"""Named recipes and each ingredient of the improved one, against reference computations."""
import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cifarjax.augment import AugmentSpec, cut_out, draw_choices
from cifarjax.config import Config
from cifarjax.errors import UserError
from cifarjax.flags import Parser, add_config_flags, given, new_config
from cifarjax.models import build_model
from cifarjax.optim import learning_rate
from cifarjax.recipes import RECIPES, recipe_config
from cifarjax.train import cross_entropy, ema_update, eval_logits
from experiments import cnn
from tests.helpers import make_image_folder, n_params

# The original project's settings, as the config had them before recipes existed.
ORIGINAL = dict(seed=0, batch_size=64, img_size=32, n_epochs=20, eval_every=2000, lr=1e-3, model="simple_cnn",
                num_classes=10, unfreeze="all", bn="frozen", conv_impl="auto", cache_features=True, dataset="auto",
                data_dir=None, decode_size=32, val_fraction=0.2, flip=True, crop_padding=0, normalize="none",
                norm_mean=None, norm_std=None, augment_backend="device", eval_batch_size=500, checkpoint_every=0,
                keep_checkpoints=3, classes=(), optimizer="adam", schedule="constant", label_smoothing=0.0,
                ema_decay=0.0, tta_flip=False, cutout=0, weight_decay=0.0, subset=0, dropout=0.3)


def parse(command, argv):
    parser = Parser(prog=command)
    add_config_flags(parser, command, recipe_config(command))
    args = parser.parse_args(argv)
    return new_config(command, args.recipe, given(args, command))


def test_original_recipe_is_todays_configuration():
    config = dataclasses.asdict(recipe_config("cnn", "original"))
    assert {k: config[k] for k in ORIGINAL} == ORIGINAL
    assert config["recipe"] == "original"


def test_recipe_then_flags():
    config = parse("cnn", ["--recipe", "improved", "--crop-padding", "2", "--lr", "0.005"])
    improved = RECIPES["cnn"]["improved"].changes
    assert config.recipe == "improved" and config.crop_padding == 2 and config.lr == 0.005
    assert config.schedule == improved["schedule"] and config.ema_decay == improved["ema_decay"]
    assert parse("cnn", ["--no-tta-flip", "--recipe", "improved"]).tta_flip is False


def test_improved_recipe_keeps_the_network():
    config = recipe_config("cnn", "improved")
    assert config.model == "simple_cnn" and config.n_epochs <= 20
    changes = RECIPES["cnn"]["improved"].changes
    assert changes["model"] == "simple_cnn" and not set(changes) & {"num_classes", "conv_impl"}


def test_dropout_flag_sets_the_rate_and_keeps_the_parameters():
    config = parse("cnn", ["--dropout", "0", "--conv-impl", "xla"])  # XLA's convolution: applied without jit
    model = build_model(config)
    assert model.dropout_rate == 0.0 and build_model(Config()).dropout_rate == 0.3
    x = jax.random.uniform(jax.random.PRNGKey(1), (2, 32, 32, 3))
    # The parameters' shapes, and any values for them: what is tested is the rate (`initialize` compiles an init
    # program, about 3 s of CPU time, that `jax.eval_shape` does not).
    shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), x[:1], train=False))
    assert n_params(shapes["params"]) == 1_025_546
    rng = np.random.default_rng(0)
    variables = jax.tree.map(lambda s: jnp.asarray(rng.normal(0, 0.1, s.shape), s.dtype), shapes)
    train = model.apply(variables, x, train=True, rngs={"dropout": jax.random.PRNGKey(2)})
    np.testing.assert_array_equal(train, model.apply(variables, x, train=False))  # rate 0: nothing dropped


def test_unknown_recipe_is_refused():
    with pytest.raises(UserError, match="unknown recipe 'fast'.*original, improved"):
        recipe_config("cnn", "fast")


def test_config_json_records_the_recipe_and_every_resolved_value(tmp_path):
    data = make_image_folder(tmp_path / "data", n_train=20, n_test=0, learnable=True)
    out = tmp_path / "run"
    cnn.main(["--data-dir", str(data), "--recipe", "improved", "--epochs", "2", "--batch-size", "8",
              "--conv-impl", "xla", "--cutout", "8", "--out", str(out)])
    config = json.loads((out / "config.json").read_text())
    assert config["recipe"] == "improved" and config["cutout"] == 8 and config["n_epochs"] == 2
    assert config["norm_mean"] is not None and len(config["norm_std"]) == 3  # dataset statistics, resolved
    assert set(config) >= {f.name for f in dataclasses.fields(Config)}
    summary = json.loads((out / "summary.json").read_text())
    assert summary["evaluated_weights"] == "moving average" and summary["recipe"] == "improved"
    assert {"val_accuracy", "best_val_accuracy", "last5_mean_val_accuracy"} <= set(summary)


@pytest.mark.parametrize("schedule", ["cosine", "onecycle"])
def test_schedules_match_their_formulas(schedule):
    config = Config(lr=0.01, n_epochs=10, schedule=schedule, warmup_epochs=2)
    rate = learning_rate(config, steps_per_epoch=10)
    total, warmup = 100, 20
    for step in (0, 5, 20, 50, 99):
        if schedule == "cosine":
            expected = 0.01 * step / warmup if step < warmup else \
                0.005 * (1 + np.cos(np.pi * (step - warmup) / (total - warmup)))
        else:  # cosine rise from lr/25 to lr, then cosine fall to lr/25/1e4
            lo, end = 0.01 / 25, 0.01 / 25 / 1e4
            if step < warmup:
                expected = lo + (0.01 - lo) * (1 - np.cos(np.pi * step / warmup)) / 2
            else:
                expected = end + (0.01 - end) * (1 + np.cos(np.pi * (step - warmup) / (total - warmup))) / 2
        assert float(rate(step)) == pytest.approx(expected, rel=1e-5, abs=1e-9), step
    assert learning_rate(Config(), 10) == 1e-3  # constant: a plain float, as the original's Adam


def test_label_smoothed_loss_matches_the_formula():
    logits = jnp.asarray(np.random.default_rng(0).normal(size=(5, 10)).astype(np.float32))
    labels = jnp.asarray([0, 3, 9, 1, 1])
    log_p = np.asarray(jax.nn.log_softmax(logits))
    target = np.full((5, 10), 0.1 / 10)
    target[np.arange(5), np.asarray(labels)] += 0.9
    np.testing.assert_allclose(cross_entropy(logits, labels, 0.1), -(target * log_p).sum(1), rtol=1e-6)
    np.testing.assert_allclose(cross_entropy(logits, labels), -log_p[np.arange(5), np.asarray(labels)], rtol=1e-6)


def test_ema_update_matches_the_formula():
    ema, params = {"w": jnp.ones(3)}, {"w": jnp.full(3, 3.0)}
    early = ema_update(ema, params, 0.999, jnp.asarray(0))  # d = min(0.999, 1/10)
    np.testing.assert_allclose(early["w"], 0.1 * 1 + 0.9 * 3, rtol=1e-6)  # float32 arithmetic
    late = ema_update(ema, params, 0.999, jnp.asarray(10**6))
    np.testing.assert_allclose(late["w"], 0.999 * 1 + 0.001 * 3, rtol=1e-6)


def test_test_time_flip_averages_the_two_views_logits():
    from cifarjax.inputs import ImageInputs
    from cifarjax.train import create_train_state

    class Model:  # logits = a fixed linear function of the image, so mirrored views give different logits
        weights = jnp.asarray(np.random.default_rng(1).normal(size=(8 * 8 * 3, 4)).astype(np.float32))

        def __call__(self, variables, x, train=False):
            return x.reshape(x.shape[0], -1) @ self.weights

    images = np.random.default_rng(2).integers(0, 256, (6, 8, 8, 3)).astype(np.uint8)
    state = create_train_state(Model(), {"params": {}}, optax.identity(), 0)
    inputs = ImageInputs(AugmentSpec(img_size=8))
    idx = jnp.arange(6)
    plain = eval_logits(state, (images, None), idx, inputs, False)
    averaged = eval_logits(state, (images, None), idx, inputs, True)
    mirrored = eval_logits(state, (np.ascontiguousarray(images[:, :, ::-1]), None), idx, inputs, False)
    assert not np.allclose(plain, mirrored, rtol=1e-2)
    # The same float32 products, summed in one program or two: within a few ulps of the largest logit.
    np.testing.assert_allclose(averaged, (plain + mirrored) / 2, rtol=0, atol=1e-6 * float(np.abs(plain).max()))


def test_cutout_zeroes_one_square_per_image():
    images = jnp.ones((3, 8, 8, 1))
    corners = jnp.asarray([[4, 4], [0, 0], [7, 2]])
    out = np.asarray(cut_out(images, corners, 4))[..., 0]
    assert (out[0, 2:6, 2:6] == 0).all() and out[0].sum() == 64 - 16
    assert (out[1, :2, :2] == 0).all() and out[1].sum() == 64 - 4  # clipped at the corner
    assert out[2].sum() == 64 - 3 * 4  # rows 5-7 only
    spec = AugmentSpec(cutout=0)
    assert not np.asarray(draw_choices(jax.random.PRNGKey(0), 4, spec).corners).any()
    a, b = draw_choices(jax.random.PRNGKey(0), 64, spec), draw_choices(jax.random.PRNGKey(0), 64, AugmentSpec(cutout=8))
    np.testing.assert_array_equal(a.flips, b.flips)  # cutout does not change the other draws
    np.testing.assert_array_equal(a.offsets, b.offsets)
