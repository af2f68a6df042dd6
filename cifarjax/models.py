"""Flax (linen) models: the original's SimpleCNN and torchvision's ResNet-18.

Both take float32 NHWC images and are applied as pure functions::

    logits = model.apply(variables, images, train=False)
    logits, updates = model.apply(variables, images, train=True, rngs={"dropout": key}, mutable=["batch_stats"])
"""
from __future__ import annotations

from typing import Optional

import jax.numpy as jnp
import flax.linen as nn

from cifarjax.layers import BatchNorm, Conv, ConvReluMaxPool, Dense, Dropout, max_pool, resolve_conv_impl

RESNET18_STAGES = ("stem", "layer1", "layer2", "layer3", "layer4")


class SimpleCNN(nn.Module):
    """The original SimpleCNNModel: three unpadded 3x3 convolutions, max pools, dropout 0.3, two linear layers.

    Conv(3→128) ReLU Dropout MaxPool2 · Conv(128→256) ReLU MaxPool2 Dropout · Conv(256→256) ReLU MaxPool4
    Dropout · Flatten · Linear(256→512) ReLU · Linear(512→classes). 1,025,546 parameters for 10 classes.

    With `conv_impl` 'winograd' (the CPU default) each conv+ReLU+pool block runs fused (`ConvReluMaxPool`):
    same parameters, same dropout masks, same outputs up to float rounding.
    """
    num_classes: int = 10
    dropout_rate: float = 0.3
    conv_impl: str = "auto"

    @nn.compact
    def __call__(self, x, train: bool = False):
        drop = lambda name: Dropout(self.dropout_rate, name=name)  # noqa: E731
        fused = resolve_conv_impl(self.conv_impl) == "winograd"
        if fused:
            x = self._fused_blocks(x, drop("dropout1"), train)
        else:
            x = nn.relu(Conv(128, 3, impl=self.conv_impl, name="conv1")(x))
            x = max_pool(drop("dropout1")(x, deterministic=not train), 2)
            x = max_pool(nn.relu(Conv(256, 3, impl=self.conv_impl, name="conv2")(x)), 2)
        x = drop("dropout2")(x, deterministic=not train)
        if fused:
            x = ConvReluMaxPool(256, 4, "winograd", name="conv3")(x)
        else:
            x = max_pool(nn.relu(Conv(256, 3, impl=self.conv_impl, name="conv3")(x)), 4)
        x = drop("dropout3")(x, deterministic=not train)
        x = x.reshape(x.shape[0], -1)
        x = nn.relu(Dense(512, name="fc1")(x))
        return Dense(self.num_classes, name="fc2")(x)

    def _fused_blocks(self, x, dropout1: Dropout, train: bool):
        """conv1 (per output phase, dropout before the pool as in the original) and conv2 (Winograd)."""
        between = None
        if train and dropout1.rate > 0:
            n, h, w, _ = x.shape
            keep = dropout1.keep_mask((n, h - 2, w - 2, 128))  # the full conv1 output's mask, as unfused
            th, tw = (h - 2) // 2, (w - 2) // 2
            # Mask each phase, pool, then scale: the same values as scaling first (max commutes with it).
            between = lambda z, pq: jnp.where(  # noqa: E731
                keep[:, pq[0]:pq[0] + 2 * th - 1:2, pq[1]:pq[1] + 2 * tw - 1:2, :], z, jnp.zeros_like(z))
        x = ConvReluMaxPool(128, 2, "phases", name="conv1")(x, between)
        if between is not None:
            x = x / (1.0 - dropout1.rate)
        return ConvReluMaxPool(256, 2, "winograd", name="conv2")(x)


def _resnet_conv_init():
    # torchvision: kaiming_normal_(mode="fan_out", nonlinearity="relu")
    return nn.initializers.variance_scaling(2.0, "fan_out", "normal")


class BasicBlock(nn.Module):
    """torchvision's BasicBlock: two 3x3 convs with BatchNorm, a 1x1 projection when the shape changes."""
    features: int
    strides: int = 1
    bn_inference: bool = True
    axis_name: Optional[str] = None
    conv_impl: str = "auto"

    @nn.compact
    def __call__(self, x):
        conv = lambda f, k, s, p, name: Conv(f, k, s, p, use_bias=False, impl=self.conv_impl,  # noqa: E731
                                             kernel_init=_resnet_conv_init(), name=name)
        norm = lambda name: BatchNorm(self.bn_inference, axis_name=self.axis_name, name=name)  # noqa: E731
        y = nn.relu(norm("bn1")(conv(self.features, 3, self.strides, 1, "conv1")(x)))
        y = norm("bn2")(conv(self.features, 3, 1, 1, "conv2")(y))
        if self.strides != 1 or x.shape[-1] != self.features:
            x = norm("downsample_bn")(conv(self.features, 1, self.strides, 0, "downsample_conv")(x))
        return nn.relu(y + x)


class ResNet18Backbone(nn.Module):
    """ResNet-18 up to the global average pool: returns (N, 512) features.

    Stage outputs (stem, layer1..layer4) are sown into the 'intermediates' collection.
    `frozen_bn_stages`: the first k stages of (stem, layer1, ..., layer4) run BatchNorm in inference mode
    even when `train=True`, so their running statistics never change.
    """
    frozen_bn_stages: int = 0
    axis_name: Optional[str] = None
    conv_impl: str = "auto"

    @nn.compact
    def __call__(self, x, train: bool = False):
        inference = [not train or i < self.frozen_bn_stages for i in range(len(RESNET18_STAGES))]
        x = Conv(64, 7, 2, 3, use_bias=False, impl=self.conv_impl, kernel_init=_resnet_conv_init(), name="conv1")(x)
        x = nn.relu(BatchNorm(inference[0], axis_name=self.axis_name, name="bn1")(x))
        x = max_pool(x, 3, 2, 1)
        self.sow("intermediates", "stem", x)
        for stage, features in enumerate((64, 128, 256, 512), start=1):
            name = RESNET18_STAGES[stage]
            for b in range(2):
                strides = 2 if (b == 0 and stage > 1) else 1
                x = BasicBlock(features, strides, inference[stage], self.axis_name, self.conv_impl,
                               name=f"{name}_block{b}")(x)
            self.sow("intermediates", name, x)
        return jnp.mean(x, axis=(1, 2))


class ResNet18(nn.Module):
    """torchvision's ResNet-18 with parameters split into 'backbone' and 'head' (the fc layer)."""
    num_classes: int = 1000
    frozen_bn_stages: int = 0
    axis_name: Optional[str] = None
    conv_impl: str = "auto"

    def setup(self):
        self.backbone = ResNet18Backbone(self.frozen_bn_stages, self.axis_name, self.conv_impl)
        self.head = Dense(self.num_classes)

    def __call__(self, x, train: bool = False):
        return self.head(self.backbone(x, train))

    def features(self, x, train: bool = False):
        """Backbone features (N, 512) after the global average pool."""
        return self.backbone(x, train)

    def classify(self, features, train: bool = False):
        """Logits from backbone features: the head alone (`train` is accepted for a uniform signature)."""
        del train
        return self.head(features)


MODELS = {"simple_cnn": SimpleCNN, "resnet18": ResNet18}
