from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import flax.linen as nn
import optax
import pytest

from cifarjax.cpu.conv import conv2d, conv3x3_maxpool, conv3x3_same, conv_phases, winograd_phases
from cifarjax.cpu.fusion import dense_transposed_backward, materialize
from cifarjax.layers import Conv, Dropout, max_pool
from cifarjax.models import ResNet18, SimpleCNN, formulations_for
from cifarjax.ops import xla_conv
from tests.helpers import n_params, skip_unless_measured_xla_cpu, temporary_bytes


def torch_simple_cnn():
    """The original project's SimpleCNNModel, layer for layer."""
    import torch
    nn = torch.nn
    return nn.Sequential(
        nn.Conv2d(3, 128, 3), nn.ReLU(), nn.Dropout(0.3), nn.MaxPool2d(2),
        nn.Conv2d(128, 256, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Dropout(0.3),
        nn.Conv2d(256, 256, 3), nn.ReLU(), nn.MaxPool2d(4), nn.Dropout(0.3),
        nn.Flatten(), nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 10))


def test_simple_cnn_has_the_originals_parameter_count():
    variables = jax.eval_shape(lambda: SimpleCNN().init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3))))
    assert n_params(variables["params"]) == 1_025_546 == sum(p.numel() for p in torch_simple_cnn().parameters())


@pytest.mark.parametrize("impl", ["winograd", "im2col", "xla"])
def test_simple_cnn_matches_the_pytorch_original_in_eval_mode(impl):
    import torch
    torch.manual_seed(0)
    ref = torch_simple_cnn().eval()
    convs = [m for m in ref if isinstance(m, torch.nn.Conv2d)]
    linears = [m for m in ref if isinstance(m, torch.nn.Linear)]
    params = {f"conv{i + 1}": {"kernel": c.weight.detach().numpy().transpose(2, 3, 1, 0),
                               "bias": c.bias.detach().numpy()} for i, c in enumerate(convs)}
    params.update({f"fc{i + 1}": {"kernel": l.weight.detach().numpy().T, "bias": l.bias.detach().numpy()}
                   for i, l in enumerate(linears)})
    x = np.random.default_rng(0).random((4, 3, 32, 32), dtype=np.float32)
    expected = ref(torch.from_numpy(x)).detach().numpy()
    got = jax.jit(partial(SimpleCNN(formulations=formulations_for(impl)).apply, train=False))({"params": params},
                                                                        jnp.asarray(x.transpose(0, 2, 3, 1)))
    # The port's specification: the largest difference at most 1e-5 of the largest logit, about 100x the rounding
    # of five float32 layers, and orders of magnitude below any difference of semantics.
    assert_relative_to_largest(got, expected, 1e-5)


F32 = np.finfo(np.float32).eps / 2  # unit roundoff


def summation_bound(magnitude, n_terms):
    """Two float32 sums of the same n products can differ by at most 2 (n + 1) u sum|products| (the standard
    forward error bound of recursive summation, in any order): a bound that holds on every CPU."""
    return 2 * (n_terms + 1) * F32 * magnitude


@pytest.mark.parametrize("size,k,stride,pad", [(17, 3, 1, 0), (17, 3, 1, 1), (17, 3, 2, 1), (17, 1, 2, 0),
                                             (2, 3, 2, 1), (1, 3, 1, 1), (3, 7, 2, 3)])
def test_im2col_convolution_equals_xla(size, k, stride, pad, rng):
    """Including small maps where some taps meet only padding and are left out (the stem's 7x7 kernel on a large
    map: test_the_cpu_formulations_are_exactly_the_convolution)."""
    x = jnp.asarray(rng.normal(size=(2, size, size, 5)).astype(np.float32))
    w = jnp.asarray(rng.normal(size=(k, k, 5, 6)).astype(np.float32))
    a, b, magnitude, ga, gb = jax.jit(lambda x, w: (  # one compiled program: the values are its separate outputs
        conv2d(x, w, stride, pad, "im2col"), xla_conv(x, w, stride, pad),
        xla_conv(jnp.abs(x), jnp.abs(w), stride, pad),
        jax.grad(lambda x: conv2d(x, w, stride, pad, "im2col").sum())(x),
        jax.grad(lambda x: xla_conv(x, w, stride, pad).sum())(x)))(x, w)
    assert (np.abs(a - b) <= summation_bound(magnitude, k * k * 5)).all()
    assert (np.abs(ga - gb) <= summation_bound(np.abs(w).sum(axis=(0, 1, 3)), k * k * 6)).all()


# Tiles 2 and 4, pools 2 and 4, odd sizes whose last row and column pooling drops, and the automatic choice.
WINOGRAD_SHAPES = [(15, 16, 2, 4), (6, 16, 4, 2), (13, 8, 2, 2), (14, 8, 4, None)]


def winograd_and_reference(rng, size, cin, pool, tile, dtype):
    """[(forward, gradient of x, gradient of w)] of XLA's convolution then max pool, and of `conv3x3_maxpool`: the
    undifferentiated forwards and both gradients of both, compiled as one program (fewer compilations; each output
    is still its own computation)."""
    x = jnp.asarray(rng.normal(size=(2, size, size, cin)).astype(dtype))
    w = jnp.asarray((rng.normal(size=(3, 3, cin, 8)) / np.sqrt(9 * cin)).astype(dtype))

    def reference(x, w):
        return max_pool(xla_conv(x, w, 1, 0), pool)

    def fused(x, w):
        return conv3x3_maxpool(x, w, pool, tile)
    cotangent = jnp.asarray(rng.normal(size=jax.eval_shape(reference, x, w).shape).astype(dtype))
    return jax.jit(lambda x, w: [(f(x, w), *jax.grad(lambda x, w: jnp.sum(f(x, w) * cotangent), (0, 1))(x, w))
                                 for f in (reference, fused)])(x, w)


def assert_relative_to_largest(got, expected, bound):
    got, expected = np.asarray(got), np.asarray(expected)  # on the host: float64 stays float64
    assert np.abs(got - expected).max() <= bound * np.abs(expected).max()


@pytest.mark.parametrize("size,cin,pool,tile", WINOGRAD_SHAPES)
def test_winograd_conv_maxpool_is_exactly_conv_then_pool(size, cin, pool, tile, rng):
    """The formulation (tiles, transforms, pooling over phases, custom gradients) is exact: in float64 it agrees
    with XLA's convolution then max pool to rounding (~1e-15), forward and both gradients."""
    with jax.enable_x64(True):
        expected, got = winograd_and_reference(rng, size, cin, pool, tile, np.float64)
    assert got[0].dtype == np.float64 and got[0].shape == expected[0].shape
    for a, b in zip(expected, got):
        assert_relative_to_largest(b, a, 1e-10)


def test_winograd_conv_maxpool_float32_error_stays_small(rng):
    """In float32, the transforms' coefficients (up to 8 and 1/24) amplify rounding beyond a direct convolution's:
    measured at most 2e-6 of the largest output on F(4x4) tiles, the larger coefficients (AVX2 and AVX-512). The
    bound, 1e-4, is 50x that; a wrong transform or tile errs by O(1)."""
    expected, got = winograd_and_reference(rng, *WINOGRAD_SHAPES[0], np.float32)
    for a, b in zip(expected, got):
        assert_relative_to_largest(b, a, 1e-4)


@pytest.mark.parametrize("size", [1, 2, (1, 2), (2, 1), 3, 8, 14])
def test_conv3x3_same_is_exactly_the_padded_convolution(size, rng):
    """Whole maps of at most 2x2 (one matmul per output), F(2x2) and F(4x4) tiles (from 14 wide), sizes that do
    not divide into tiles (3, 14): exact in float64, forward and both gradients."""
    height, width = size if isinstance(size, tuple) else (size, size)
    with jax.enable_x64(True):
        x = jnp.asarray(rng.normal(size=(2, height, width, 5)))
        w = jnp.asarray(rng.normal(size=(3, 3, 5, 6)))
        cotangent = jnp.asarray(rng.normal(size=(2, height, width, 6)))
        outputs = jax.jit(lambda x, w: [  # one compiled program: each forward and gradient its own output
            (f(x, w), *jax.grad(lambda x, w: jnp.sum(f(x, w) * cotangent), (0, 1))(x, w))
            for f in (lambda x, w: xla_conv(x, w, 1, 1), conv3x3_same)])(x, w)
    for a, b in zip(*outputs):
        assert_relative_to_largest(b, a, 1e-10)


@pytest.mark.parametrize("m", [2, 4])
def test_recomputing_the_winograd_tiles_changes_no_bit(m, rng):
    """`keep_tiles=False` recomputes B^T d B for the kernel's gradient instead of keeping it: the same
    computation, so the forward pass and both gradients are bitwise those of keeping the tiles."""
    x = jnp.asarray(rng.normal(size=(3, 4 * m + 2, 3 * m + 2, 5)).astype(np.float32))
    w = jnp.asarray(rng.normal(size=(3, 3, 5, 6)).astype(np.float32))
    cotangent = jnp.asarray(rng.normal(size=(m, m, 3, 4, 3, 6)).astype(np.float32))

    def conv(keep_tiles, x, w):
        def f(x, w):
            return jnp.stack([jnp.stack(row) for row in winograd_phases(x, w, m, 4, 3, keep_tiles=keep_tiles)])
        return f(x, w), *jax.grad(lambda x, w: jnp.sum(f(x, w) * cotangent), (0, 1))(x, w)
    # Both in one compiled program. Only the kernel's gradient differs between them (recomputed tiles inside the
    # conditional against kept ones); the forward and the input's gradient are the same operations either way, as
    # they were in two programs: compared so that a change to them shows.
    kept, recomputed = jax.jit(lambda x, w: (conv(True, x, w), conv(False, x, w)))(x, w)
    for a, b in zip(kept, recomputed):
        np.testing.assert_array_equal(a, b)


def test_recomputed_winograd_tiles_are_not_kept_for_the_backward_pass():
    """Four convolutions of padded maps, differentiated: recomputing the tiles must leave XLA fewer bytes of
    temporaries than keeping them, by at least one convolution's tiles. XLA would silently keep the forward's
    tiles (and the bits would still match) if the recomputation were merged with them or its conditional folded
    away, as it is when the predicate reads a padded map's constant first element. Buffer sizes, not timings.
    F(2x2) tiles, though only F(4x4) recomputes in the models: the recomputation (`winograd_products`) is the same
    code for both, m only picks the transform's matrices, and F(2x2)'s program compiles in half the time (6.5 s of
    CPU against 13.7 s for the pair). Measured 2026-12-08: recomputing saves 1.18 convolutions' tiles here (F(4x4):
    1.20); with fewer convolutions it saves less than one (F(4x4) with three, two or one, F(2x2) with two: so
    four), and where `keep_tiles` has no effect the two programs' temporaries are equal, failing the test."""
    skip_unless_measured_xla_cpu("the temporaries kept for the backward pass")
    x, w = jnp.ones((4, 34, 34, 16)), jnp.full((3, 3, 16, 16), 0.01)  # 16 x 16 F(2x2) tiles of 32 x 32 outputs

    def temporaries(keep_tiles):
        def f(x, w):
            for _ in range(4):
                y = winograd_phases(x, w, 2, 16, 16, keep_tiles=keep_tiles)
                x = jnp.pad(jax.nn.relu(jnp.concatenate([jnp.concatenate(row, 2) for row in y], 1)),
                            ((0, 0), (1, 1), (1, 1), (0, 0)))
            return jnp.sum(x ** 2)
        return temporary_bytes(jax.jit(jax.grad(f, (0, 1))).lower(x, w).compile(), "the Winograd tiles' bytes")
    one_convolutions_tiles = 16 * 4 * 16 * 16 * 16 * 4  # (m + 2)^2 tiles' values of n x th x tw x cin, float32
    assert temporaries(False) <= temporaries(True) - one_convolutions_tiles


def test_inference_convolutions_use_f4x4_tiles_from_8x8_maps(rng):
    """Where no train-mode BatchNorm follows (`inference`), differentiated 8x8 maps run F(4x4); otherwise F(2x2),
    whose half rounding error train-mode BatchNorm over few values would amplify. Bitwise the chosen formulation."""
    x = jnp.asarray(rng.normal(size=(2, 8, 8, 5)).astype(np.float32))
    w = jnp.asarray(rng.normal(size=(3, 3, 5, 6)).astype(np.float32))

    def pairs(x, w):  # (chosen, expected) for each mode, one compiled program: only identical computations merge
        return [(jax.vjp(lambda x: conv2d(x, w, 1, 1, "winograd", inference=inference), x)[0],
                 conv3x3_same(x, w, tile=tile)) for inference, tile in ((True, 4), (False, 2))]
    for got, expected in jax.jit(pairs)(x, w):
        np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("size", [4, 8, 13, 14])
def test_undifferentiated_convolutions_of_8_to_13_wide_maps_are_xlas(size, rng):
    """3x3 'same' convolutions of 8x8 to 13x13 maps that nothing differentiates (evaluation) run XLA's forward,
    others and all differentiated ones `conv3x3_same`, bitwise; the gradients are always `conv3x3_same`'s. (All
    compared in one compiled program: the choice is made while tracing, so an undifferentiated call stays
    undifferentiated beside the gradients, and only identical computations can be merged into identical bits.)"""
    x = jnp.asarray(rng.normal(size=(2, size, size, 5)).astype(np.float32))
    w = jnp.asarray(rng.normal(size=(3, 3, 5, 6)).astype(np.float32))
    dy = jnp.asarray(rng.normal(size=(2, size, size, 6)).astype(np.float32))

    def outputs(x, w):  # for each mode: (chosen forward, expected forward), (chosen gradients, conv3x3_same's)
        pairs = []
        for inference in (True, False):
            def chosen(x, w):
                return conv2d(x, w, 1, 1, "winograd", inference=inference)

            def winograd(x, w):
                return conv3x3_same(x, w, inference=inference)
            expected = (lambda x, w: xla_conv(x, w, 1, 1)) if 8 <= size <= 13 else winograd
            pairs.append((chosen(x, w), expected(x, w)))
            pairs.extend(zip(jax.vjp(chosen, x, w)[1](dy), jax.vjp(winograd, x, w)[1](dy)))
        return pairs
    for a, b in jax.jit(outputs)(x, w):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("train,frozen_bn_stages,expected", [
    (False, 0, [True] * 5), (True, 0, [False] * 5), (True, 2, [True, True, False, False, False])])
def test_resnet_convolutions_know_whether_their_batchnorm_trains(train, frozen_bn_stages, expected):
    """Each stage's convolutions (stem, layer1..4) run the inference formulation exactly where its BatchNorm runs
    in inference mode."""
    seen, formulations = {}, formulations_for("winograd", "cpu")

    def record(next_fun, args, kwargs, context):
        if isinstance(context.module, Conv) and context.method_name == "__call__":
            stage = context.module.path[1] if len(context.module.path) > 2 else "stem"
            seen.setdefault(stage.split("_")[0], set()).add(context.module.convolve is formulations.eval_convolve)
        return next_fun(*args, **kwargs)
    model = ResNet18(10, frozen_bn_stages=frozen_bn_stages, formulations=formulations)
    variables = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((2, 32, 32, 3)))
    with nn.intercept_methods(record):
        jax.eval_shape(lambda v: model.apply(v, jnp.zeros((2, 32, 32, 3)), train=train, mutable=["batch_stats"]),
                       variables)
    assert [seen[s] for s in ("stem", "layer1", "layer2", "layer3", "layer4")] == [{e} for e in expected]


# Input channels choose the kernel gradient only where XLA runs the forward (large maps, not 3x3 stride-1 'same').
@pytest.mark.parametrize("size,k,stride,pad,cin", [(32, 3, 1, 1, 8), (8, 3, 2, 1, 8)] + [
    (*shape, cin) for shape in ((33, 3, 2, 1), (32, 1, 2, 0), (34, 7, 2, 3)) for cin in (3, 8)])
def test_the_cpu_formulations_are_exactly_the_convolution(size, k, stride, pad, cin, rng):
    """conv_impl 'winograd' picks a formulation per shape (Winograd for 3x3 stride-1 'same', else XLA forward with
    an im2col backward on large maps, im2col on small ones; XLA's kernel gradient for images' few channels): exact
    in float64, forward and both gradients."""
    with jax.enable_x64(True):
        x = jnp.asarray(rng.normal(size=(2, size, size, cin)))
        w = jnp.asarray(rng.normal(size=(k, k, cin, 4)))
        out = (size + 2 * pad - k) // stride + 1
        cotangent = jnp.asarray(rng.normal(size=(2, out, out, 4)))
        outputs = jax.jit(lambda x, w: [  # one compiled program: each forward and gradient its own output
            (f(x, w), *jax.grad(lambda x, w: jnp.sum(f(x, w) * cotangent), (0, 1))(x, w))
            for f in (lambda x, w: xla_conv(x, w, stride, pad),
                      lambda x, w: conv2d(x, w, stride, pad, "winograd"))])(x, w)
    for a, b in zip(*outputs):
        assert_relative_to_largest(b, a, 1e-10)


@pytest.mark.parametrize("cin,convolutions", [(3, 1), (8, 0)])
def test_the_stems_kernel_gradient_is_xlas_convolution(cin, convolutions):
    """On large maps with few input channels (the stem's images) the kernel gradient is XLA's own convolution,
    2.2x faster than im2col's there; with more channels it stays im2col. (The forward convolution, unused by the
    gradient, is left out of the lowered program.)"""
    x, w = jnp.zeros((2, 32, 32, cin)), jnp.zeros((7, 7, cin, 4))
    program = jax.jit(jax.grad(lambda w: jnp.sum(conv2d(x, w, 2, 3, "winograd")))).lower(w).as_text()
    assert program.count("stablehlo.convolution") == convolutions


def test_conv_phases_are_the_strided_convolution_output(rng):
    x = jnp.asarray(rng.normal(size=(2, 11, 11, 3)).astype(np.float32))
    w = jnp.asarray(rng.normal(size=(3, 3, 3, 4)).astype(np.float32))
    full = xla_conv(x, w, 1, 0)
    magnitude = xla_conv(jnp.abs(x), jnp.abs(w), 1, 0)
    for (p, q), phase in conv_phases(x, w, 2).items():
        assert (np.abs(phase - full[:, p:8:2, q:8:2]) <= summation_bound(magnitude[:, p:8:2, q:8:2], 27)).all()


def test_fused_simple_cnn_equals_the_unfused_one_in_training(rng):
    """Same parameters, same dropout masks, same logits and gradients: the same function, so in float64 they
    agree to rounding (~1e-14; a wrong mask or a missing scale would differ by O(1))."""
    x = jnp.asarray(rng.random((2, 32, 32, 3)))  # two images: each has its own dropout masks
    y = jnp.arange(2)
    fused, plain = (SimpleCNN(formulations=formulations_for(impl)) for impl in ("winograd", "im2col"))
    variables = jax.jit(plain.init)(jax.random.PRNGKey(0), x[:1])
    jax.tree.map(np.testing.assert_array_equal, jax.jit(fused.init)(jax.random.PRNGKey(0), x[:1]), variables)
    rngs = {"dropout": jax.random.PRNGKey(3)}

    def loss(model, params):
        logits = model.apply({"params": params}, x, train=True, rngs=rngs)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), logits

    with jax.enable_x64(True):
        params = jax.tree.map(lambda v: jnp.asarray(v, jnp.float64), variables["params"])
        x = jnp.asarray(x, jnp.float64)
        (la, za), ga = jax.jit(jax.value_and_grad(partial(loss, plain), has_aux=True))(params)
        (lb, zb), gb = jax.jit(jax.value_and_grad(partial(loss, fused), has_aux=True))(params)
    assert zb.dtype == np.float64
    assert_relative_to_largest(zb, za, 1e-10)
    for a, b in zip(jax.tree.leaves(ga), jax.tree.leaves(gb)):
        assert_relative_to_largest(b, a, 1e-9)


def test_materialize_is_the_identity_with_gradients(rng):
    x = jnp.asarray(rng.normal(size=(4, 5)).astype(np.float32))
    np.testing.assert_array_equal(jax.jit(materialize)(x), x)
    np.testing.assert_array_equal(jax.grad(lambda x: jnp.sum(materialize(x) * 3.0))(x), np.full((4, 5), 3.0))


@pytest.mark.parametrize("window,stride,pad,size", [(2, 2, 0, 30), (2, 2, 0, 13), (4, 4, 0, 4), (3, 2, 1, 16),
                                                     (3, 2, 1, 15), (3, 2, 0, 17), (3, 1, 1, 6), (5, 2, 2, 13)])
def test_max_pool_and_its_gradient_match_pytorch(window, stride, pad, size, rng):
    """Values exactly; gradients up to the order in which overlapping windows' contributions are added. Padded or
    overlapping windows (ResNet's stem) send a tie's gradient to the first maximum, as PyTorch; non-overlapping
    ones (only after a ReLU, where ties are zeros with zero gradient) share it, as XLA's reduce-max does."""
    import torch
    x = rng.normal(size=(2, 3, size, size)).astype(np.float32)
    if stride < window or pad:
        x[0, 0, :4, :4] = 0.5  # ties
    xt = torch.from_numpy(x).requires_grad_(True)
    expected = torch.nn.functional.max_pool2d(xt, window, stride, pad)
    dy = rng.normal(size=expected.shape).astype(np.float32)
    (expected * torch.from_numpy(dy)).sum().backward()
    xj = jnp.asarray(x.transpose(0, 2, 3, 1))
    got = jax.jit(lambda x: max_pool(x, window, stride, pad))(xj)
    np.testing.assert_array_equal(np.asarray(got).transpose(0, 3, 1, 2), expected.detach().numpy())
    keeping_an_index = jax.jit(lambda x: jax.vjp(lambda x: max_pool(x, window, stride, pad), x)[0])  # the forward
    np.testing.assert_array_equal(keeping_an_index(xj), got)  # differentiated
    dx = jax.jit(jax.grad(lambda x: jnp.sum(max_pool(x, window, stride, pad) * dy.transpose(0, 2, 3, 1))))(xj)
    np.testing.assert_allclose(np.asarray(dx).transpose(0, 3, 1, 2), xt.grad.numpy(), rtol=1e-6, atol=1e-6)


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
    model = SimpleCNN()  # XLA's convolutions: the fused path's masks are checked against this one above
    x = jnp.ones((2, 32, 32, 3))
    v = jax.jit(model.init)(jax.random.PRNGKey(0), x)
    apply = jax.jit(model.apply, static_argnames="train")
    a = apply(v, x, train=False)
    b = apply(v, x, train=False)
    np.testing.assert_array_equal(a, b)
    c = apply(v, x, train=True, rngs={"dropout": jax.random.PRNGKey(1)})
    assert not np.allclose(a, c)


def test_resnet_parameter_names_split_backbone_and_head():
    v = jax.eval_shape(lambda: ResNet18(10).init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3))))
    assert set(v["params"]) == {"backbone", "head"}
    assert v["params"]["head"]["kernel"].shape == (512, 10)
    assert "layer4_block1" in v["params"]["backbone"] and "bn1" in v["batch_stats"]["backbone"]
    torchvision = __import__("torchvision")
    assert n_params(v["params"]) == sum(p.numel() for p in torchvision.models.resnet18(num_classes=10).parameters())


def test_dense_transposed_backward_is_exact():
    """Dense's CPU gradient (a transposed copy of x times g) equals autodiff of x @ k + b. In float64 both sum the
    same 64 products per kernel entry in possibly different orders: a relative difference near 1e-15, so 1e-12
    says "the same formula" on any CPU, while a wrong transpose or missing term is off by O(1)."""
    rng = np.random.default_rng(0)
    with jax.enable_x64(True):
        x, k, b = (jnp.asarray(rng.standard_normal(s)) for s in ((64, 512), (512, 10), (10,)))
        loss = lambda f: lambda *a: jnp.sum(jnp.sin(f(*a)))  # noqa: E731 - a gradient that varies per entry
        got = jax.grad(loss(dense_transposed_backward), argnums=(0, 1, 2))(x, k, b)
        expected = jax.grad(loss(lambda x, k, b: x @ k + b), argnums=(0, 1, 2))(x, k, b)
    for g, e in zip(got, expected):
        assert g.dtype == np.float64 and g.shape == e.shape
        np.testing.assert_allclose(g, e, rtol=1e-12, atol=1e-12)
