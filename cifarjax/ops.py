"""Array operations the plain layers (`cifarjax.layers`) and the CPU's formulations (`cifarjax.cpu`) share."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax import lax


def torch_uniform(key, shape, dtype=jnp.float32, fan_in=None):
    """PyTorch's default Conv2d/Linear init: U(-1/sqrt(fan_in), 1/sqrt(fan_in)), fan_in a weight's prod(shape[:-1])."""
    bound = 1.0 / math.sqrt(fan_in or math.prod(shape[:-1]))
    return jax.random.uniform(key, shape, dtype, -bound, bound)


def xla_conv(x, kernel, strides: int, padding: int):
    """NHWC x HWIO convolution with symmetric zero padding, XLA's own."""
    x = x.astype(jnp.result_type(x, kernel))  # float32 images meet float64 kernels in the float64 tests
    return lax.conv_general_dilated(x, kernel, (strides, strides), [(padding, padding)] * 2,
                                    dimension_numbers=("NHWC", "HWIO", "NHWC"))


def interleave(phases):
    """phases[r][s] of shape (n, h, w, c) -> (n, k*h, k*w, c) with out[:, k*i + r, k*j + s] = phases[r][s][:, i, j]."""
    k = len(phases)
    n, h, w, c = phases[0][0].shape
    return jnp.stack([jnp.stack(row, axis=3) for row in phases], axis=2).reshape(n, k * h, k * w, c)
