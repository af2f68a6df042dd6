"""The program a GPU gets, proven on a CPU machine: each step built for platform "gpu" and exported for CUDA
(`jax.export`, which only lowers: nothing compiles or runs) is plain JAX. Its module has no conditional whose
predicate is computed from data (XLA's GPU runtime would copy the predicate to the host and wait, every step),
its convolutions are `stablehlo.convolution`s, exactly as many as the network's forward and backward passes
need, its matrix products exactly the linear layers' (no Winograd or im2col formulation), and it calls no
custom call beyond the sharding markers of `pmap`. Built for platform "cpu", the same steps still get the
CPU's formulations (`cifarjax.cpu`).

Each case builds its step through `export_step`, which takes Config changes; under bf16 the convolutions'
operands, the activations and their gradients are bfloat16 while parameters and optimizer state (the step's
floating inputs) stay float32.
"""
import functools
import re
from collections import Counter

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cifarjax.augment import AugmentSpec
from cifarjax.config import Config
from cifarjax.freezing import Freezing
from cifarjax.inputs import FeatureInputs, ImageInputs
from cifarjax.models import Apply, build_model
from cifarjax.optim import make_optimizer
from cifarjax.target import step_factory
from cifarjax.train import DataParallel, StepOptions, create_train_state

N_DEVICES, PER_DEVICE = 2, 2
# What pmap's shard_map leaves in a module: sharding annotations, nothing a backend implements.
SHARDING_CALLS = {"Sharding", "SPMDFullToShardShape", "SPMDShardToFullShape"}

# ResNet-18's convolutions: the stem, two per block, and layer2-4's 1x1 projections.
RESNET18_CONVS = 1 + 4 * 2 * 2 + 3
RESNET18_BATCHNORMS = RESNET18_CONVS  # one after each convolution
RESNET18_PARAMETERS = RESNET18_CONVS + 2 * RESNET18_BATCHNORMS + 2  # kernels, BatchNorm scales and biases, the head
LAYER4_CONVS = 2 * 2 + 1
SIMPLE_CNN_CONVS = 3


@functools.lru_cache(maxsize=None)
def gpu_export(name: str, precision: str = "fp32") -> jax.export.Exported:
    """CASES[name]'s step built for the GPU at `precision`, exported for CUDA (once for the tests that read it)."""
    kind, changes, _, _ = CASES[name]
    return export_step(kind, "gpu", precision=precision, **changes)


def gpu_module(name: str, precision: str = "fp32") -> str:
    """The text of `gpu_export`'s module."""
    return gpu_export(name, precision).mlir_module()


def export_step(kind: str, platform: str, platforms=("cuda",), **changes):
    """`build_step`'s step exported for `platforms`."""
    step, args = build_step(kind, platform, **changes)
    return jax.export.export(jax.jit(step), platforms=platforms)(*args)


def build_step(kind: str, platform: str, **changes):
    """(the pmap-ed step DataParallel builds for `platform`, its abstract arguments: 2 devices, 2 examples each).
    `kind`: 'train', 'eval', 'steps' (3 training steps in one call) or 'features' (the cached-feature head's 3
    steps in one call); `changes`: Config fields."""
    config = Config(**{"batch_size": N_DEVICES * PER_DEVICE, **changes}).validate()
    model = build_model(config, platform=platform)
    size = config.img_size
    variables = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, size, size, 3)), train=False))
    freezing = Freezing.from_config(config)
    trainable = None if freezing.everything_trains else freezing.trainable_mask(variables["params"])
    tx = make_optimizer(config, variables["params"], platform=platform)
    features = kind == "features"
    inputs = FeatureInputs(AugmentSpec()) if features else ImageInputs(AugmentSpec.from_config(config))
    apply = Apply(model, "classify" if features else None)
    parallel = DataParallel(inputs, trainable, jax.devices()[:N_DEVICES], StepOptions.from_config(config),
                            step_factory(platform))
    state = jax.eval_shape(lambda v: create_train_state(apply, v, tx, 0, config.ema_decay > 0, freezing), variables)

    def replicated(tree):
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct((N_DEVICES,) + x.shape, x.dtype), tree)
    n = N_DEVICES * PER_DEVICE
    if features:
        data = jax.ShapeDtypeStruct((n, 2, 512), jnp.float32), jax.ShapeDtypeStruct((n,), jnp.int32)
    else:
        data = jax.ShapeDtypeStruct((n, size, size, 3), jnp.uint8), jax.ShapeDtypeStruct((n,), jnp.int32)
    idx = jax.ShapeDtypeStruct((N_DEVICES, PER_DEVICE), jnp.int32)
    if kind in ("features", "steps"):
        step, idx = parallel.train_steps, jax.ShapeDtypeStruct((N_DEVICES, 3, PER_DEVICE), jnp.int32)  # 3 steps
    else:
        step = parallel.eval_step if kind == "eval" else parallel.train_step
    return step, (replicated(state), replicated(data), idx)


@functools.lru_cache(maxsize=None)
def lowered_text(platform: str, name: str) -> str:
    """The text of CASES[name]'s step built for `platform`, lowered by its pmap for this machine (a CPU): the
    module with the step's buffer donations, which an export leaves out (once for the tests that read it)."""
    kind, changes, _, _ = CASES[name]
    step, args = build_step(kind, platform, **changes)
    return step.lower(*args).as_text()


def op_counts(text: str) -> Counter:
    return Counter(re.findall(r"\bstablehlo\.[a-z_]+\b", text))


def custom_calls(text: str) -> set:
    return set(re.findall(r"stablehlo\.custom_call @([\w.$-]+)", text))


def conditionals(text: str) -> list:
    """(operation, whether its predicate or index is a constant) for each stablehlo.case/if, looked up within its
    function. `lax.platform_dependent` leaves a case on a constant index, or a case on the result of a case on a
    constant whose branches only return constants: both constant, and XLA folds them."""
    found = []
    for function in re.split(r"(?=\bfunc\.func\b)", text):
        constants = set(re.findall(r"(%[\w#.]+) = stablehlo\.constant\b", function))
        lines = function.splitlines()
        for i, line in enumerate(lines):
            match = re.search(r"(%[\w#.]+)(?::\d+)? = \"?stablehlo\.(case|if)\"?\((%[\w#.]+)", line)
            if not match:
                continue
            result, op, operand = match.groups()
            found.append((op, operand in constants))
            indent = len(line) - len(line.lstrip())
            body = []
            for inner in lines[i + 1:]:
                if len(inner) - len(inner.lstrip()) == indent and inner.lstrip().startswith("})"):
                    break
                body.append(inner.strip())
            returned = [v.strip() for b in body if b.startswith("stablehlo.return ")
                        for v in b[len("stablehlo.return "):].split(" : ")[0].split(",")]
            if operand in constants and all(b.startswith(("stablehlo.return ", "}, {")) for b in body) \
                    and all(v in constants for v in returned):
                constants.add(result)
    return found


# Elementwise operations: each result is a tensor an XLA fusion may write to memory between kernels.
ELEMENTWISE = {"add", "subtract", "multiply", "divide", "maximum", "minimum", "select", "negate"}


def activation_results(text: str) -> Counter:
    """(operation, element type) of each floating elementwise result shaped like an activation or its gradient:
    (the per-device batch, height, width, channels), more channels than the images' 3 (kernels lead with 1, 3 or
    7). Dropout's integer hash is not counted."""
    found = Counter()
    results = re.findall(r"= stablehlo\.(\w+) %[^\n]*?[:,] tensor<((?:\d+x)+)([a-z]\w*)>(?: loc|\n)", text)
    for op, shape, dtype in results:
        dims = [int(d) for d in shape.split("x")[:-1]]
        if op in ELEMENTWISE and dtype in ("f32", "bf16") and len(dims) == 4 and dims[0] == PER_DEVICE and dims[-1] > 3:
            found[op, dtype] += 1
    return found


def collectives(text: str) -> Counter:
    return Counter(re.findall(r"\bstablehlo\.(all_reduce|all_gather|reduce_scatter|all_to_all|collective_permute)\b",
                              text))


def assert_plain(text: str, convolutions: int, products: int):
    counts = op_counts(text)
    assert [c for c in conditionals(text) if not c[1]] == [], "a conditional on data reaches the GPU program"
    assert counts["stablehlo.convolution"] == convolutions, counts["stablehlo.convolution"]
    assert counts["stablehlo.dot_general"] == products, counts["stablehlo.dot_general"]  # the linear layers' only
    assert custom_calls(text) <= SHARDING_CALLS, custom_calls(text) - SHARDING_CALLS


# (kind, Config changes, forward + backward convolutions, forward + backward products). In a training step every
# training convolution has a kernel gradient, and an input gradient where something before it trains (not the
# stem's on the images); the head's input gradient only where the backbone trains. Each count is read once, at
# 32 pixels and fp32; the cases that differ: one step at 224 (resized on the device to ResNet's ImageNet size)
# and, in bf16, the two steps whose activations `test_bf16_activations_and_their_gradients_stay_bfloat16` reads.
RESNET = dict(model="resnet18", weights="random")
CASES = {
    "simple_cnn_train": ("train", {}, SIMPLE_CNN_CONVS + 3 + 2, 2 + 2 * 2),
    "simple_cnn_eval": ("eval", {}, SIMPLE_CNN_CONVS, 2),
    "resnet_head_32": ("train", {**RESNET, "unfreeze": "head", "bn": "train"}, RESNET18_CONVS, 1 + 1),
    "resnet_layer4_32": ("train", {**RESNET, "unfreeze": "layer4"},
                         RESNET18_CONVS + LAYER4_CONVS + (LAYER4_CONVS - 2), 1 + 2),
    "resnet_all_32": ("train", {**RESNET, "unfreeze": "all"}, RESNET18_CONVS * 3 - 1, 1 + 2),
    "resnet_all_224": ("train", {**RESNET, "unfreeze": "all", "img_size": 224}, RESNET18_CONVS * 3 - 1, 1 + 2),
    "resnet_eval_32": ("eval", RESNET, RESNET18_CONVS, 1),
    "cached_feature_head": ("features", {**RESNET, "unfreeze": "head"}, 0, 1 + 1),
}


@pytest.mark.parametrize("name, precision", [(name, "fp32") for name in CASES] +
                         [("simple_cnn_train", "bf16"), ("resnet_all_32", "bf16")])
def test_the_gpu_program_is_plain_jax(name, precision):
    _, _, convolutions, products = CASES[name]
    exported = gpu_export(name, precision)
    text = exported.mlir_module()
    assert_plain(text, convolutions, products)
    operands = {"fp32": "f32", "bf16": "bf16"}[precision]
    found = re.findall(r"stablehlo\.convolution\(.*?: \(tensor<[\dx]*x(\w+)>, tensor<[\dx]*x(\w+)>\)", text)
    assert len(found) == convolutions and set(found) <= {(operands, operands)}, found
    assert {str(a.dtype) for a in exported.in_avals if jnp.issubdtype(a.dtype, jnp.floating)} == {"float32"}  # state


@pytest.mark.parametrize("name", ["simple_cnn_train", "resnet_layer4_32"])
def test_several_steps_per_call_hold_one_copy_of_the_step_in_a_loop(name):
    """3 steps in one call are a rolled loop: one while loop around one step's convolutions and products."""
    _, changes, convolutions, products = CASES[name]
    text = export_step("steps", "gpu", **changes).mlir_module()
    assert_plain(text, convolutions, products)
    assert op_counts(text)["stablehlo.while"] == 1
    assert op_counts(gpu_module(name))["stablehlo.while"] == 0


def test_the_moving_average_takes_only_what_trains():
    """With --ema-decay, the step's state grows by the trainable parameters and the train-mode BatchNorm
    statistics (layer4's, where layer4 trains), never by a copy of the frozen layers."""
    _, changes, _, _ = CASES["resnet_layer4_32"]
    # The step's arguments as `build_step` shapes them, which are what its export takes (its `in_avals`): the
    # step itself need not be traced and lowered to be sized.
    sizes = [sum(int(np.prod(a.shape)) for a in jax.tree.leaves(build_step("train", "gpu", **extra, **changes)[1]))
             for extra in ({}, {"ema_decay": 0.9})]
    config = Config(**changes)
    variables = jax.eval_shape(lambda: build_model(config).init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3))))
    flat = jax.tree_util.tree_leaves_with_path(variables)
    size = lambda leaves: sum(int(np.prod(x.shape)) for x in leaves)  # noqa: E731
    trained = size(x for path, x in flat if re.search(r"'(head|layer4_block\d)'", jax.tree_util.keystr(path)))
    assert sizes[1] - sizes[0] == N_DEVICES * trained and size(x for _, x in flat) - trained > 2_000_000  # stem-layer3


@pytest.mark.parametrize("name, batchnorms", [("simple_cnn_train", 0), ("resnet_all_32", RESNET18_BATCHNORMS)])
def test_bf16_activations_and_their_gradients_stay_bfloat16(name, batchnorms):
    """Under bf16 every activation-sized elementwise result (ReLUs, pooling, residual sums, BatchNorm's
    normalisation, their gradients) is bfloat16, so a GPU moves 2 bytes per element between layers. The only
    float32 ones are train-mode BatchNorm's centred squares, which XLA fuses into the float32 reduction of the
    variance. Under fp32 the same results are all float32 (the reading finds what it looks for)."""
    bf16, fp32 = activation_results(gpu_module(name, "bf16")), activation_results(gpu_module(name, "fp32"))
    float32 = {op: n for (op, dtype), n in bf16.items() if dtype == "f32"}
    assert set(float32) <= ({"subtract", "multiply"} if batchnorms else set()), float32
    assert all(n <= batchnorms for n in float32.values()), float32
    assert bf16["add", "bf16"] and bf16["maximum", "bf16"], bf16
    assert {dtype for _, dtype in fp32} == {"f32"} and sum(fp32.values()) >= sum(bf16.values()), fp32


def test_the_originals_head_step_runs_the_backbone_forward_only():
    """The original fine-tune's step (the head trains, the frozen backbone's BatchNorm on batch statistics) over 2
    devices: the backbone's convolutions forward only (CASES), its BatchNorm moments gathered once each, and no
    gradient of a frozen layer computed or averaged: the all-reduces are the head's two gradients and the metrics."""
    found = collectives(gpu_module("resnet_head_32", "fp32"))
    assert found == {"all_reduce": 2 + 2, "all_gather": RESNET18_BATCHNORMS}, found


def test_synchronised_batchnorm_takes_one_collective_each_way():
    """The 2-device step where all of ResNet-18 trains: one all-reduce per parameter's gradient, per BatchNorm one
    all-gather of the devices' moments (forward) and one all-reduce of its two backward sums, and one per metric:
    62 + 2 x 20 + 2 = 104 collectives (before XLA's combiner), where two per BatchNorm each way made 144."""
    found = collectives(gpu_module("resnet_all_32", "fp32"))
    assert found == {"all_reduce": RESNET18_PARAMETERS + RESNET18_BATCHNORMS + 2, "all_gather": RESNET18_BATCHNORMS}
    assert sum(found.values()) <= 104


@pytest.mark.parametrize("platform, donated", [("gpu", "all"), ("cpu", "none")])
def test_the_gpu_program_donates_the_state(platform, donated):
    """Built for a GPU, the training step donates its whole state; built for the CPU, where everything trains,
    nothing (`cifarjax.cpu.donation`: only frozen parameters)."""
    text = lowered_text(platform, "simple_cnn_train")  # build_step("train", platform)
    donors = text.count("jax.buffer_donor = true") + text.count("tf.aliasing_output")
    leaves = len(jax.tree.leaves(build_step("train", platform)[1][0]))
    assert donors == (leaves if donated == "all" else 0), (donors, leaves)


def test_the_check_sees_a_conditional_on_data_and_not_a_constant_one():
    """The test's own reading of conditionals: a `lax.cond` on data is one, `lax.platform_dependent` is not."""
    def f(x):
        x = jax.lax.platform_dependent(x, cpu=lambda x: x + 1, default=lambda x: x * 2)
        return jax.lax.cond(x[0] > 0, lambda x: x + 1, lambda x: x - 1, x)
    text = jax.export.export(jax.jit(f), platforms=("cuda",))(jax.ShapeDtypeStruct((4,), jnp.float32)).mlir_module()
    assert sorted(c[1] for c in conditionals(text)) == [False, True, True]


@pytest.mark.parametrize("name", ["simple_cnn_train", "resnet_all_32"])
def test_the_cpu_program_keeps_the_cpu_formulations(name):
    """The same steps built for the CPU (lowered for it; SimpleCNN's lowering is the one whose donations
    `test_the_gpu_program_donates_the_state` reads) get the CPU's formulations: Winograd/im2col products in place
    of convolutions, and the fusion barriers, conditionals on data (`cifarjax.cpu.fusion`)."""
    _, _, convolutions, products = CASES[name]
    text = lowered_text("cpu", name)
    counts = op_counts(text)
    assert counts["stablehlo.convolution"] < convolutions
    assert counts["stablehlo.dot_general"] > products + 10  # Winograd's and im2col's matrix products
    assert any(not constant for _, constant in conditionals(text))
    with pytest.raises(AssertionError, match="conditional on data"):  # the check above would refuse it
        assert_plain(text, convolutions, products)


def test_gpu_and_cpu_programs_share_parameters_and_optimizer_state():
    """A checkpoint does not depend on the platform that wrote it: the same parameter and optimizer-state trees."""
    config = Config(model="simple_cnn", optimizer="sgd")
    trees = []
    for platform in ("gpu", "cpu"):
        model = build_model(config, platform=platform)
        variables = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3))))
        state = jax.eval_shape(make_optimizer(config, variables["params"], platform=platform).init, variables["params"])
        trees.append(jax.tree.map(lambda x: (x.shape, x.dtype), (variables, state)))
    assert trees[0] == trees[1]

