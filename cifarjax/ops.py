"""Array operations the plain layers (`cifarjax.layers`) and the CPU's formulations (`cifarjax.cpu`) share."""
from __future__ import annotations

import functools
import math
import operator

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


def overlap_add(taps, stride: int, size, padding: int = 0):
    """The transpose of gathering taps[i][j] = padded x[:, i::stride, j::stride] (x: (n, *size, c)): each tap added
    where it read, per input phase (rows stride * a + p, columns stride * b + q) a sum of shifted taps, interleaved."""
    k, s, (n, ho, wo, c) = len(taps), stride, taps[0][0].shape
    reach = (k - 1) // s + 1  # a phase row gathers from `reach` tap rows

    def phase(p, q):  # summed from its first tap, not from 0 (un-jitted, `0 + -0.0` would give +0.0)
        parts = [jnp.pad(taps[p + di * s][q + dj * s], ((0, 0), (di, reach - 1 - di), (dj, reach - 1 - dj), (0, 0)))
                 for di in range(reach) for dj in range(reach) if p + di * s < k and q + dj * s < k]
        return functools.reduce(operator.add, parts) if parts else \
            jnp.zeros((n, ho + reach - 1, wo + reach - 1, c), taps[0][0].dtype)  # a phase no tap reads
    dx = interleave([[phase(p, q) for q in range(s)] for p in range(s)])
    h, w = size[0] + 2 * padding, size[1] + 2 * padding  # dx covers the padded input's first rows and columns
    dx = jnp.pad(dx, ((0, 0), (0, max(0, h - dx.shape[1])), (0, max(0, w - dx.shape[2])), (0, 0)))
    return dx[:, padding:padding + size[0], padding:padding + size[1], :]
