"""Flax models (the original's SimpleCNN, torchvision's ResNet-18) on float32 NHWC images, and `build_model`."""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache, partial
from typing import Any, Callable, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from cifarjax.cpu.conv import ConvReluMaxPool, conv2d
from cifarjax.cpu.fusion import dense_transposed_backward, materialize
from cifarjax.freezing import STAGES, Freezing
from cifarjax.layers import BatchNorm, Conv, Dense, Dropout, affine, max_pool
from cifarjax.ops import xla_conv
from cifarjax.target import conv_impl, resolve

ModuleDef = Any
AXIS = "devices"  # the device axis of the pmap-ed steps, over which BatchNorm statistics are synchronised


@dataclass(frozen=True)
class Formulations:
    """How a model's layers compute, injected by the builder (`formulations_for`): XLA's own by default."""
    convolve: Callable = xla_conv  # `Conv`'s (x, kernel, strides, padding) -> y
    eval_convolve: Callable = xla_conv  # the same where an inference-mode BatchNorm follows (ResNet)
    linear: Callable = affine  # `Dense`'s (x, kernel, bias) -> x @ kernel + bias
    keep: Optional[Callable] = None  # what overlapping max pooling's maximum and index pass through (`max_pool`)
    conv_pool: Optional[ModuleDef] = None  # SimpleCNN's fused conv3x3+ReLU+max-pool block; None: unfused


class SimpleCNN(nn.Module):
    """The original SimpleCNNModel: three unpadded 3x3 Conv ReLU MaxPool Dropout blocks, Linear ReLU Linear; fused
    blocks with `Formulations.conv_pool` (the same parameters and masks) unless a `dtype` asks for XLA's."""
    num_classes: int = 10
    dropout_rate: float = 0.3
    dtype: Optional[Any] = None  # of the convolutions', matrix products' operands, activations (None: float32)
    formulations: Formulations = Formulations()

    @nn.compact
    def __call__(self, x, train: bool = False):
        ops, drop = self.formulations, lambda name: Dropout(self.dropout_rate, name=name)  # noqa: E731
        fused = self.dtype is None and ops.conv_pool is not None
        conv = partial(Conv, dtype=self.dtype, convolve=ops.convolve)
        if fused:  # conv1 per output phase, its dropout before the pool as in the original
            dropout1, (n, h, w, _) = drop("dropout1"), x.shape
            # the full conv1 output's mask, as unfused: mask each phase, pool, then scale (max commutes with scaling)
            keep = dropout1.keep_mask((n, h - 2, w - 2, 128)) if train and dropout1.rate > 0 else None
            x = ops.conv_pool(128, 2, "phases", name="conv1")(x, keep)
            x = x if keep is None else x / (1.0 - dropout1.rate)
        else:
            x = max_pool(drop("dropout1")(nn.relu(conv(128, 3, name="conv1")(x)), deterministic=not train), 2)
        for features, pool, i in ((256, 2, 2), (256, 4, 3)):  # max_pool(relu(conv3x3(x)), pool), then dropout
            block = ops.conv_pool(features, pool, "winograd", name=f"conv{i}") if fused else \
                (lambda x: max_pool(nn.relu(conv(features, 3, name=f"conv{i}")(x)), pool))
            x = drop(f"dropout{i}")(block(x), deterministic=not train)
        x = nn.relu(Dense(512, self.dtype, ops.linear, name="fc1")(x.reshape(x.shape[0], -1)))
        return Dense(self.num_classes, self.dtype, ops.linear, name="fc2")(x)


RESNET_CONV_INIT = nn.initializers.variance_scaling(2.0, "fan_out", "normal")  # torchvision's kaiming_normal_


class BasicBlock(nn.Module):
    """torchvision's BasicBlock: two 3x3 convs with BatchNorm, a 1x1 projection when the shape changes."""
    filters: int
    conv: ModuleDef
    norm: ModuleDef
    strides: int = 1

    @nn.compact
    def __call__(self, x):
        y = nn.relu(self.norm(name="bn1")(self.conv(self.filters, 3, self.strides, 1, name="conv1")(x)))
        y = self.norm(name="bn2")(self.conv(self.filters, 3, 1, 1, name="conv2")(y))
        if self.strides != 1 or x.shape[-1] != self.filters:
            x = self.norm(name="downsample_bn")(self.conv(self.filters, 1, self.strides, 0, name="downsample_conv")(x))
        return nn.relu(y + x)


class ResNetBackbone(nn.Module):
    """A torchvision ResNet up to the global average pool, stage outputs sown into 'intermediates'."""
    stage_sizes: Sequence[int]
    num_filters: int = 64
    frozen_bn_stages: int = 0  # BatchNorm in eval mode in the first this many stages (the stem is stage 0)
    axis_name: Optional[str] = None
    dtype: Optional[Any] = None  # of the convolutions' operands and the activations; BatchNorm's statistics float32
    formulations: Formulations = Formulations()

    @nn.compact
    def __call__(self, x, train: bool = False):
        def layers(stage):  # a stage's (conv, norm): BatchNorm in inference mode where the stage does not train
            inference, ops = not train or stage < self.frozen_bn_stages, self.formulations
            return (partial(Conv, use_bias=False, kernel_init=RESNET_CONV_INIT, dtype=self.dtype,
                            convolve=ops.eval_convolve if inference else ops.convolve),
                    partial(BatchNorm, inference, axis_name=self.axis_name))

        conv, norm = layers(0)
        x = nn.relu(norm(name="bn1")(conv(self.num_filters, 7, 2, 3, name="conv1")(x)))
        x = max_pool(x, 3, 2, 1, keep=self.formulations.keep)
        self.sow("intermediates", "stem", x)
        for i, size in enumerate(self.stage_sizes):
            for b in range(size):
                x = BasicBlock(self.num_filters * 2 ** i, *layers(i + 1), 2 if (b == 0 and i > 0) else 1,
                               name=f"layer{i + 1}_block{b}")(x)
            self.sow("intermediates", f"layer{i + 1}", x)
        return jnp.mean(x, axis=(1, 2))


class ResNet(nn.Module):
    """A torchvision ResNet with parameters split into 'backbone' and 'head' (the fc layer)."""
    num_classes: int = 1000
    stage_sizes: Sequence[int] = (2, 2, 2, 2)
    frozen_bn_stages: int = 0
    axis_name: Optional[str] = None
    num_filters: int = 64
    dtype: Optional[Any] = None  # of the convolutions' and the head's operands and the activations (None: float32)
    formulations: Formulations = Formulations()

    def setup(self):
        self.backbone = ResNetBackbone(self.stage_sizes, self.num_filters, self.frozen_bn_stages, self.axis_name,
                                       self.dtype, self.formulations)
        self.head = Dense(self.num_classes, self.dtype, self.formulations.linear)

    def __call__(self, x, train: bool = False):
        return self.head(self.backbone(x, train))

    def features(self, x, train: bool = False):
        """Backbone features after the global average pool."""
        return self.backbone(x, train)

    def classify(self, features, train: bool = False):
        """Logits from backbone features: the head alone (`train` only for a uniform signature)."""
        return self.head(features)


ResNet18 = ResNet  # its defaults are ResNet-18's
assert len(STAGES) == 1 + len(ResNet18.stage_sizes)


@dataclass(frozen=True)
class Apply:
    """`model.apply(..., method=method)`, equal for equal models (bound methods are not), so steps are reused."""
    model: nn.Module
    method: Optional[str] = None

    def __call__(self, variables, *args, **kwargs):
        return self.model.apply(variables, *args, method=self.method, **kwargs)


def compute_dtype(precision: str):
    """The operand type of convolutions and matrix products for `Config.precision` (None: float32 throughout)."""
    return {"fp32": None, "bf16": jnp.bfloat16}[precision]


@lru_cache(maxsize=None)
def formulations_for(impl: str = "xla", platform: str = "gpu") -> Formulations:
    """The formulations of `platform` and `Config.conv_impl`, one object per choice (models built alike are equal)."""
    impl = conv_impl(impl, platform)
    cpu = {"linear": dense_transposed_backward, "keep": materialize} if platform == "cpu" else {}
    if impl == "xla":
        return Formulations(**cpu)
    return Formulations(partial(conv2d, impl=impl), partial(conv2d, impl=impl, inference=True),
                        conv_pool=ConvReluMaxPool if impl == "winograd" else None, **cpu)


def build_model(config, platform: Optional[str] = None):
    """The configured model for `platform` (default `target.resolve()`), ResNet-18's BatchNorm modes from freezing."""
    dtype, formulations = compute_dtype(config.precision), formulations_for(config.conv_impl, resolve(platform))
    if config.model == "simple_cnn":
        return SimpleCNN(config.num_classes, config.dropout, dtype, formulations)
    return ResNet18(config.num_classes, frozen_bn_stages=Freezing.from_config(config).frozen_bn_stages,
                    axis_name=AXIS, dtype=dtype, formulations=formulations)


@lru_cache(maxsize=16)
def _jitted_init(model, img_size: int):
    return jax.jit(lambda key: model.init(key, jnp.zeros((1, img_size, img_size, 3), jnp.float32), train=False))


def initialize(model, seed: int = 0, img_size: int = 32) -> dict:
    """Seeded fresh variables (host arrays), compiled in one piece (op by op: 10-20 s on a CPU, other last bits)."""
    return jax.device_get(dict(_jitted_init(model, img_size)(jax.random.PRNGKey(seed))))


def init_variables(model, config) -> dict:
    """Freshly initialised variables of a run's model, seeded by config.seed."""
    return initialize(model, config.seed, config.img_size)
