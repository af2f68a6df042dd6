from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

from cifarjax.layers import Dropout, conv2d, conv3x3_maxpool, conv_phases, materialize, max_pool
from cifarjax.models import ResNet18, SimpleCNN


def torch_simple_cnn():
    """The original project's SimpleCNNModel, layer for layer."""
    nn = torch.nn
    return nn.Sequential(
        nn.Conv2d(3, 128, 3), nn.ReLU(), nn.Dropout(0.3), nn.MaxPool2d(2),
        nn.Conv2d(128, 256, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Dropout(0.3),
        nn.Conv2d(256, 256, 3), nn.ReLU(), nn.MaxPool2d(4), nn.Dropout(0.3),
        nn.Flatten(), nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 10))


def n_params(tree):
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def test_simple_cnn_has_the_originals_parameter_count():
    variables = SimpleCNN().init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)))
    assert n_params(variables["params"]) == 1_025_546 == sum(p.numel() for p in torch_simple_cnn().parameters())


@pytest.mark.parametrize("impl", ["winograd", "im2col", "xla"])
def test_simple_cnn_matches_the_pytorch_original_in_eval_mode(impl):
    torch.manual_seed(0)
    ref = torch_simple_cnn().eval()
    convs = [m for m in ref if isinstance(m, torch.nn.Conv2d)]
    linears = [m for m in ref if isinstance(m, torch.nn.Linear)]
    params = {f"conv{i + 1}": {"kernel": c.weight.detach().numpy().transpose(2, 3, 1, 0), "bias": c.bias.detach().numpy()}
              for i, c in enumerate(convs)}
    params.update({f"fc{i + 1}": {"kernel": l.weight.detach().numpy().T, "bias": l.bias.detach().numpy()}
                   for i, l in enumerate(linears)})
    x = np.random.default_rng(0).random((4, 3, 32, 32), dtype=np.float32)
    expected = ref(torch.from_numpy(x)).detach().numpy()
    got = SimpleCNN(conv_impl=impl).apply({"params": params}, jnp.asarray(x.transpose(0, 2, 3, 1)), train=False)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("k,stride,pad", [(3, 1, 0), (3, 1, 1), (3, 2, 1), (1, 2, 0), (7, 2, 3)])
def test_im2col_convolution_equals_xla(k, stride, pad, rng):
    x = jnp.asarray(rng.normal(size=(2, 17, 17, 5)).astype(np.float32))
    w = jnp.asarray(rng.normal(size=(k, k, 5, 6)).astype(np.float32))
    a = conv2d(x, w, stride, pad, "im2col")
    b = conv2d(x, w, stride, pad, "xla")
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
    ga = jax.grad(lambda x: conv2d(x, w, stride, pad, "im2col").sum())(x)
    gb = jax.grad(lambda x: conv2d(x, w, stride, pad, "xla").sum())(x)
    np.testing.assert_allclose(ga, gb, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("size,cin,pool,tile", [(15, 16, 2, 2), (15, 16, 2, 4), (6, 16, 4, 2), (6, 16, 4, 4),
                                               (17, 8, 2, None), (9, 8, 2, None), (14, 8, 4, None), (13, 8, 2, 2)])
def test_winograd_conv_maxpool_equals_xla_conv_then_pool(size, cin, pool, tile, rng):
    x = jnp.asarray(rng.normal(size=(3, size, size, cin)).astype(np.float32))
    w = jnp.asarray((rng.normal(size=(3, 3, cin, 8)) / np.sqrt(9 * cin)).astype(np.float32))
    reference = lambda x, w: max_pool(conv2d(x, w, impl="xla"), pool)  # noqa: E731
    fused = lambda x, w: conv3x3_maxpool(x, w, pool, tile)  # noqa: E731
    expected, got = reference(x, w), fused(x, w)
    assert got.shape == expected.shape

    def assert_close(b, a):  # error relative to the largest magnitude, as float32 Winograd guarantees
        assert float(jnp.abs(b - a).max()) <= 1e-5 * float(jnp.abs(a).max())

    assert_close(got, expected)
    cotangent = jnp.asarray(rng.normal(size=expected.shape).astype(np.float32))
    grads = [jax.grad(lambda x, w: jnp.sum(f(x, w) * cotangent), (0, 1))(x, w) for f in (reference, fused)]
    for a, b in zip(*grads):
        assert_close(b, a)


def test_conv_phases_are_the_strided_convolution_output(rng):
    x = jnp.asarray(rng.normal(size=(2, 11, 11, 3)).astype(np.float32))
    w = jnp.asarray(rng.normal(size=(3, 3, 3, 4)).astype(np.float32))
    full = conv2d(x, w, impl="xla")
    for (p, q), phase in conv_phases(x, w, 2).items():
        np.testing.assert_allclose(phase, full[:, p:8:2, q:8:2], rtol=1e-5, atol=1e-5)


def test_fused_simple_cnn_equals_the_unfused_one_in_training(rng):
    """Same parameters, same dropout masks, same logits and gradients (to float rounding)."""
    x = jnp.asarray(rng.random((8, 32, 32, 3)).astype(np.float32))
    y = jnp.arange(8) % 10
    fused, plain = SimpleCNN(conv_impl="winograd"), SimpleCNN(conv_impl="im2col")
    variables = plain.init(jax.random.PRNGKey(0), x[:1])
    jax.tree.map(np.testing.assert_array_equal, fused.init(jax.random.PRNGKey(0), x[:1]), variables)
    rngs = {"dropout": jax.random.PRNGKey(3)}

    def loss(model, params):
        logits = model.apply({"params": params}, x, train=True, rngs=rngs)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), logits

    (la, za), ga = jax.value_and_grad(partial(loss, plain), has_aux=True)(variables["params"])
    (lb, zb), gb = jax.value_and_grad(partial(loss, fused), has_aux=True)(variables["params"])
    np.testing.assert_allclose(zb, za, rtol=1e-5, atol=1e-6)
    for a, b in zip(jax.tree.leaves(ga), jax.tree.leaves(gb)):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-4 * float(jnp.abs(a).max()))


def test_materialize_is_the_identity_with_gradients(rng):
    x = jnp.asarray(rng.normal(size=(4, 5)).astype(np.float32))
    np.testing.assert_array_equal(jax.jit(materialize)(x), x)
    np.testing.assert_array_equal(jax.grad(lambda x: jnp.sum(materialize(x) * 3.0))(x), np.full((4, 5), 3.0))


@pytest.mark.parametrize("window,stride,pad,size", [(2, 2, 0, 30), (2, 2, 0, 13), (4, 4, 0, 4), (3, 2, 1, 16)])
def test_max_pool_matches_pytorch(window, stride, pad, size, rng):
    x = rng.normal(size=(2, 3, size, size)).astype(np.float32)
    expected = torch.nn.functional.max_pool2d(torch.from_numpy(x), window, stride, pad).numpy()
    got = max_pool(jnp.asarray(x.transpose(0, 2, 3, 1)), window, stride, pad)
    np.testing.assert_array_equal(np.asarray(got).transpose(0, 3, 1, 2), expected)


def test_dropout_rate_scaling_and_determinism():
    x = jnp.ones((64, 30, 30, 16))
    layer = Dropout(0.3)
    y = np.asarray(layer.apply({}, x, deterministic=False, rngs={"dropout": jax.random.PRNGKey(0)}))
    kept = y != 0
    assert abs(kept.mean() - 0.7) < 0.003
    np.testing.assert_allclose(y[kept], 1 / 0.7, rtol=1e-6)
    again = layer.apply({}, x, deterministic=False, rngs={"dropout": jax.random.PRNGKey(0)})
    other = layer.apply({}, x, deterministic=False, rngs={"dropout": jax.random.PRNGKey(1)})
    np.testing.assert_array_equal(y, again)
    assert not np.array_equal(y, other)
    # neighbouring masks are independent: agreement rate of a Bernoulli(0.7) pair
    flat = kept.ravel()
    assert abs((flat[1:] == flat[:-1]).mean() - 0.58) < 0.005
    np.testing.assert_array_equal(layer.apply({}, x, deterministic=True), x)


def test_simple_cnn_dropout_only_in_training():
    model = SimpleCNN()
    x = jnp.ones((2, 32, 32, 3))
    v = model.init(jax.random.PRNGKey(0), x)
    a = model.apply(v, x, train=False)
    b = model.apply(v, x, train=False)
    np.testing.assert_array_equal(a, b)
    c = model.apply(v, x, train=True, rngs={"dropout": jax.random.PRNGKey(1)})
    assert not np.allclose(a, c)


def test_resnet_parameter_names_split_backbone_and_head():
    v = jax.eval_shape(lambda: ResNet18(10).init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3))))
    assert set(v["params"]) == {"backbone", "head"}
    assert v["params"]["head"]["kernel"].shape == (512, 10)
    assert "layer4_block1" in v["params"]["backbone"] and "bn1" in v["batch_stats"]["backbone"]
    assert n_params(v["params"]) == sum(p.numel() for p in __import__("torchvision").models.resnet18(num_classes=10).parameters())
