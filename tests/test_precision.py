"""Mixed precision (`Config.precision` 'bf16'): bfloat16 operands in convolutions and matrix products, float32
everywhere state lives (parameters, optimizer moments, BatchNorm statistics, checkpoints) and where the loss is
computed."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from cifarjax.augment import AugmentSpec
from cifarjax.config import Config
from cifarjax.errors import UserError
from cifarjax.flags import resumed_config
from cifarjax.inputs import ImageInputs
from cifarjax.layers import batch_norm_train
from cifarjax.loop import train_loop
from cifarjax.models import AXIS, build_model, compute_dtype, initialize
from cifarjax.optim import make_optimizer
from cifarjax.train import DataParallel, create_train_state
from tests.test_train import fast, small_resnet, tiny_split

# bfloat16 keeps 8 significant bits: each rounding (an input, a weight, a layer's output) is off by at most 2^-9
# (0.2%) of the value. A handful of layers compose a few dozen such roundings, partly cancelling, so logits
# differ from float32's by about 1% of their spread (measured 0.3-0.9% here, three seeds of each model); 3% bounds
# that on any CPU, while a wrong computation (a lost bias, a layer left out, the wrong weights) is off by tens of
# percent.
BF16_RELATIVE = 3e-2


def dtypes(tree) -> set:
    return {str(x.dtype) for x in jax.tree.leaves(tree)}


def train_steps(model, variables, config, steps=2, n_devices=2):
    """`steps` training steps on 2 devices; the state (unreplicated) and the last step's metrics."""
    data = tiny_split(16)
    parallel = DataParallel(ImageInputs(AugmentSpec()), devices=jax.local_devices()[:n_devices])
    state = parallel.replicate(create_train_state(model.apply, variables, make_optimizer(config, variables["params"]),
                                                  0))
    resident = parallel.replicate((data.images, data.labels))
    for s in range(steps):
        idx = (np.arange(8) + 8 * s) % len(data)
        state, metrics = parallel.train_step(state, resident, idx.reshape(n_devices, -1).astype(np.int32))
    return parallel.unreplicate(state), jax.device_get(metrics)


def relative_error(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - b)) / np.ptp(b))


def test_a_bf16_step_keeps_its_state_in_float32_and_its_logits_near_float32s():
    """On a ResNet: BatchNorm statistics too (SimpleCNN's logits: the next test; its run: the one after)."""
    config = fast(precision="bf16")
    f32, bf16 = small_resnet(axis_name=AXIS), small_resnet(axis_name=AXIS, dtype=jnp.bfloat16)
    assert bf16.dtype == jnp.bfloat16 and f32.dtype is None
    variables = initialize(f32)
    images = tiny_split(8).images.astype(np.float32) / 255
    # The same float32 parameters whatever the precision (their types, without compiling a second `init`).
    assert dtypes(jax.eval_shape(lambda: bf16.init(jax.random.PRNGKey(0), images[:1], train=False))) == {"float32"}

    # Each model's forward compiled in one piece (op by op, each operation compiles alone: 3.3 s of CPU against 1.5)
    want = np.asarray(jax.jit(f32.apply)(variables, images))
    got = jax.jit(bf16.apply)(variables, images)
    assert got.dtype == jnp.bfloat16
    assert relative_error(got, want) < BF16_RELATIVE
    assert relative_error(got, want) > 0  # bfloat16 arithmetic did happen

    state, metrics = train_steps(bf16, variables, config)
    assert dtypes(state.params) == {"float32"}
    assert dtypes(state.opt_state) <= {"float32", "int32"}  # moments in float32, the step count an integer
    assert dtypes(state.batch_stats) <= {"float32"}
    assert np.all(np.isfinite(metrics["loss"])) and metrics["loss"].dtype == np.float32
    assert not np.array_equal(jax.tree.leaves(state.params)[0], jax.tree.leaves(variables["params"])[0])


def test_cpu_formulations_are_bypassed_under_bf16():
    """Under bf16 the Winograd/im2col blocks give way to XLA's convolution of bfloat16 operands (what a GPU runs),
    whatever `conv_impl` says; float32's formulation is unchanged. Its logits lie near float32's."""
    config = fast(conv_impl="winograd", precision="bf16")
    images = jnp.asarray(tiny_split(2).images, jnp.float32) / 255
    variables = initialize(build_model(config))
    jaxpr = str(jax.make_jaxpr(lambda v: build_model(config).apply(v, images))(variables))
    assert "conv_general_dilated" in jaxpr and "bf16[3,3,3,128]" in jaxpr
    f32 = str(jax.make_jaxpr(lambda v: build_model(config.replace(precision="fp32")).apply(v, images))(variables))
    assert "bf16" not in f32
    assert build_model(config).dtype == jnp.bfloat16
    got, want = (jax.jit(build_model(c).apply)(variables, images) for c in (config, fast()))
    assert got.dtype == jnp.bfloat16 and 0 < relative_error(got, np.asarray(want)) < BF16_RELATIVE


def test_bf16_run_records_its_precision_checkpoints_float32_and_resumes_only_unchanged(tmp_path):
    config = fast(precision="bf16", n_epochs=1)
    result = train_loop(config, tiny_split(16), tiny_split(8, seed=1), run=tmp_path)
    assert np.isfinite(result.history.train_loss).all()
    assert dtypes(result.variables["params"]) == {"float32"}

    manager = ocp.CheckpointManager(tmp_path / "checkpoints")
    stored = manager.restore(manager.latest_step(), args=ocp.args.Composite(
        variables=ocp.args.StandardRestore(), train=ocp.args.StandardRestore()))  # as written, no target dtypes
    manager.close()
    assert dtypes(stored.variables["params"]) == {"float32"}
    assert dtypes(stored.train["opt_state"]) <= {"float32", "int32"}

    saved = Config.from_dict(json.loads(json.dumps(config.to_dict())))
    assert saved.precision == "bf16"
    with pytest.raises(UserError, match="precision: 'bf16' → 'fp32'"):
        resumed_config(saved, {"precision": "fp32"}, None, str(tmp_path))
    assert resumed_config(saved, {"precision": "bf16", "n_epochs": 2}, None, str(tmp_path)).n_epochs == 2


def test_precision_names_its_operand_type():
    assert compute_dtype("fp32") is None and compute_dtype("bf16") == jnp.bfloat16
    assert build_model(Config()).dtype is None  # the default is float32, as before


def test_bf16_batchnorm_computes_statistics_in_float32_and_returns_bfloat16():
    """Train-mode BatchNorm on bfloat16 activations: statistics and the parameters' gradients in float32, the output
    and the input's gradient in bfloat16, each near float32's computation on the same (bfloat16-rounded) inputs.
    bfloat16 rounds each of the normalisation's four operations to 2^-9 of its value, so 1% of the output's spread
    bounds what is left (a wrong statistic is off by its whole size)."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(3.0, 2.0, (8, 4, 4, 16)), jnp.bfloat16)
    dy = jnp.asarray(rng.normal(0.0, 1.0, x.shape), jnp.bfloat16)
    scale, bias = jnp.asarray(rng.normal(1.0, 0.2, 16), jnp.float32), jnp.zeros(16)
    zero = jnp.zeros(16)

    def run(x, dy):
        (y, mean, var), vjp = jax.vjp(lambda x, s, b: batch_norm_train(x, s, b, 1e-5, None), x, scale, bias)
        return (y, mean, var), vjp((dy, zero, zero))
    (y, mean, var), (dx, dscale, dbias) = run(x, dy)
    (y32, mean32, var32), (dx32, dscale32, dbias32) = run(x.astype(jnp.float32), dy.astype(jnp.float32))
    assert y.dtype == dx.dtype == jnp.bfloat16
    assert mean.dtype == var.dtype == dscale.dtype == dbias.dtype == jnp.float32
    np.testing.assert_allclose(mean, mean32, rtol=1e-6)  # the same float32 sums of the same values
    np.testing.assert_allclose(var, var32, rtol=1e-6)
    np.testing.assert_allclose(dbias, dbias32, rtol=1e-6)
    for got, want in ((y, y32), (dx, dx32), (dscale, dscale32)):
        assert relative_error(got, np.asarray(want)) < 1e-2
