"""Layers with PyTorch's numerics in plain JAX (`Dropout`'s counter-hash mask ~50x cheaper than threefry on a CPU);
how convolutions and linear layers compute is injected (`models.Formulations`), as into flax's `nn.Conv`."""
from __future__ import annotations

import math
from functools import partial
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import flax.linen as nn
from jax import lax

from cifarjax.ops import overlap_add, torch_uniform, xla_conv


class Conv(nn.Module):
    """2-D convolution, square kernel, symmetric padding (PyTorch semantics), NHWC."""
    features: int
    kernel_size: int
    strides: int = 1
    padding: int = 0
    use_bias: bool = True
    kernel_init: Optional[callable] = None
    dtype: Optional[Any] = None  # the operands' type (bfloat16: mixed precision); None: the inputs' own
    convolve: Callable = xla_conv  # (x, kernel, strides, padding) -> y, in float32 (mixed precision: XLA's)

    @nn.compact
    def __call__(self, x):
        shape = (self.kernel_size, self.kernel_size, x.shape[-1], self.features)
        kernel = self.param("kernel", self.kernel_init or torch_uniform, shape)
        if self.dtype is None:
            y = self.convolve(x, kernel, self.strides, self.padding)
        else:  # mixed precision: XLA's convolution of cast operands (the CPU formulations are float32's)
            y = xla_conv(x.astype(self.dtype), kernel.astype(self.dtype), self.strides, self.padding)
        if self.use_bias:
            bias = self.param("bias", partial(torch_uniform, fan_in=math.prod(shape[:-1])), (self.features,))
            y = y + (bias if self.dtype is None else bias.astype(self.dtype))
        return y


def affine(x, kernel, bias):
    """x @ kernel + bias: `Dense`'s default `linear`."""
    return x @ kernel + bias


class Dense(nn.Module):
    """Fully connected layer, PyTorch's initialisation, kernel stored as (in, out); `dtype` as `Conv`'s."""
    features: int
    dtype: Optional[Any] = None
    linear: Callable = affine  # (x, kernel, bias) -> x @ kernel + bias

    @nn.compact
    def __call__(self, x):
        kernel = self.param("kernel", torch_uniform, (x.shape[-1], self.features))
        bias = self.param("bias", partial(torch_uniform, fan_in=x.shape[-1]), (self.features,))
        if self.dtype is not None:
            x, kernel, bias = x.astype(self.dtype), kernel.astype(self.dtype), bias.astype(self.dtype)
        return self.linear(x, kernel, bias)


def _normalize(x, mean, inv, scale, bias):
    """(x - mean) * inv * scale + bias in the activations' type."""
    cast = lambda v: v.astype(x.dtype)  # noqa: E731  (a no-op in float32)
    return (x - cast(mean)) * cast(inv) * cast(scale) + cast(bias)


def _batch_norm_train_fwd(x, scale, bias, epsilon, axis_name):
    # two passes per device as PyTorch's, the devices' shares combined exactly (Chan et al.) after one gather
    axes, acc = tuple(range(x.ndim - 1)), jnp.promote_types(x.dtype, jnp.float32)
    devices = 1 if axis_name is None else lax.axis_size(axis_name)
    # Over one device a pmean is the identity, but XLA fuses around it: without it the CPU program's moments
    # came out different in the last bit (measured), so it stays where it stood and one device's results with it.
    alone = partial(lax.pmean, axis_name=axis_name) if axis_name is not None and devices == 1 else lambda v: v
    mean = alone(x.mean(axes, dtype=acc))
    var = alone(jnp.square(x.astype(acc) - mean).mean(axes))
    if devices > 1:
        means, variances = lax.all_gather(jnp.stack([mean, var]), axis_name, axis=1)
        mean = means.mean(0)
        var = (variances + jnp.square(means - mean)).mean(0)
    inv = lax.rsqrt(var + epsilon)
    return (_normalize(x, mean, inv, scale, bias), mean, var), (x, mean, inv, scale)


@partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def batch_norm_train(x, scale, bias, epsilon: float, axis_name: Optional[str]):
    """Train-mode batch norm: (y, mean, biased variance), differentiated by hand (the statistics feed no loss)."""
    return _batch_norm_train_fwd(x, scale, bias, epsilon, axis_name)[0]


def _batch_norm_train_bwd(epsilon, axis_name, residuals, cotangents):
    (x, mean, inv, scale), dy, axes = residuals, cotangents[0], tuple(range(cotangents[0].ndim - 1))
    acc, cast = jnp.promote_types(x.dtype, jnp.float32), lambda v: v.astype(x.dtype)  # noqa: E731
    xhat = (x - cast(mean)) * cast(inv)
    dbias, dscale = dy.sum(axes, dtype=acc), (dy * xhat).sum(axes, dtype=acc)  # this device's share
    devices = 1 if axis_name is None else lax.axis_size(axis_name)
    count, sum_dy, sum_dy_xhat = math.prod(x.shape[:-1]) * devices, dbias, dscale
    if devices > 1:  # the statistics span every device, so dx needs the sums over every device
        sum_dy, sum_dy_xhat = lax.psum(jnp.stack([sum_dy, sum_dy_xhat]), axis_name)  # one all-reduce
    dx = cast(scale * inv) * (dy - cast(sum_dy / count) - xhat * cast(sum_dy_xhat / count))
    return dx, dscale, dbias


batch_norm_train.defvjp(_batch_norm_train_fwd, _batch_norm_train_bwd)


class BatchNorm(nn.Module):
    """PyTorch BatchNorm2d (eps 1e-5, momentum 0.1, running_var from the unbiased variance); `axis_name`: statistics
    over every device's batch, so N devices match one. Float32 statistics, the output in the input's type."""
    use_running_average: bool = False
    momentum: float = 0.1
    epsilon: float = 1e-5
    axis_name: Optional[str] = None

    @nn.compact
    def __call__(self, x):
        c = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (c,))
        bias = self.param("bias", nn.initializers.zeros, (c,))
        ra_mean = self.variable("batch_stats", "mean", jnp.zeros, (c,))
        ra_var = self.variable("batch_stats", "var", jnp.ones, (c,))
        if self.use_running_average:
            return _normalize(x, ra_mean.value, lax.rsqrt(ra_var.value + self.epsilon), scale, bias)
        synced = self.axis_name if not self.is_initializing() else None
        y, mean, var = batch_norm_train(x, scale, bias, self.epsilon, synced)
        if not self.is_initializing():
            count = math.prod(x.shape[:-1]) * (1 if synced is None else lax.axis_size(synced))
            unbiased = var * (count / (count - 1))
            ra_mean.value = (1 - self.momentum) * ra_mean.value + self.momentum * mean
            ra_var.value = (1 - self.momentum) * ra_var.value + self.momentum * unbiased
        return y


class Dropout(nn.Module):
    """Inverted dropout (zero with probability `rate`, scale the rest by 1/(1-rate)); needs the 'dropout' rng."""
    rate: float

    def keep_mask(self, shape):
        """`__call__`'s boolean keep mask: a counter hash (lowbias32) per element, seeded by one 'dropout' draw."""
        seed = jax.random.bits(self.make_rng("dropout"), (), jnp.uint32)
        h = lax.iota(jnp.uint32, math.prod(shape)).reshape(shape) * jnp.uint32(0x9E3779B9) + seed
        for shift, multiplier in ((16, 0x7FEB352D), (15, 0x846CA68B)):
            h = (h ^ (h >> shift)) * jnp.uint32(multiplier)
        return (h ^ (h >> 16)) >= jnp.uint32(min(int(round(self.rate * 2**32)), 2**32 - 1))

    def __call__(self, x, deterministic: bool):
        if deterministic or self.rate == 0.0:
            return x
        # masking before scaling: the same bits as SimpleCNN's fused block (mask, pool, then scale)
        return jnp.where(self.keep_mask(x.shape), x, jnp.zeros_like(x)) / (1.0 - self.rate)


def max_pool(x, window: int, strides: Optional[int] = None, padding: int = 0, keep: Optional[Callable] = None):
    """PyTorch's MaxPool2d, NHWC: non-overlapping windows as a reshape and a maximum, others `window_max_pool`."""
    strides = strides or window
    if strides == window and padding == 0:
        n, h, w, c = x.shape
        ho, wo = h // window, w // window
        return x[:, :ho * window, :wo * window, :].reshape(n, ho, window, wo, window, c).max(axis=(2, 4))
    return window_max_pool(x, window, strides, padding, keep)


@partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3, 4))
def window_max_pool(x, window: int, strides: int, padding: int, keep: Optional[Callable] = None):
    """Overlapping max pooling: XLA's `reduce_window` (3x faster) undifferentiated, else by the first maximum's."""
    return lax.reduce_window(x, -jnp.inf, lax.max, (1, window, window, 1), (1, strides, strides, 1),
                             ((0, 0), (padding, padding), (padding, padding), (0, 0)))


def _window_max_pool_fwd(x, window, strides, padding, keep):
    padded = jnp.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)), constant_values=-jnp.inf)
    ho, wo = (padded.shape[1] - window) // strides + 1, (padded.shape[2] - window) // strides + 1
    span_h, span_w = strides * (ho - 1) + 1, strides * (wo - 1) + 1
    taps = [padded[:, i:i + span_h:strides, j:j + span_w:strides] for i in range(window) for j in range(window)]
    index = jnp.int8 if len(taps) <= 127 else jnp.int32
    out, first = taps[0], jnp.zeros(taps[0].shape, index)
    for t, tap in enumerate(taps[1:], 1):
        first = jnp.where(tap > out, index(t), first)
        out = jnp.maximum(out, tap)
    if keep is not None:
        out, first = keep((out, first))
    return out, (first, x.shape)


def _window_max_pool_bwd(window, strides, padding, keep, residuals, g):
    first, (_, h, w, _) = residuals
    taps = [[jnp.where(first == i * window + j, g, jnp.zeros_like(g)) for j in range(window)] for i in range(window)]
    return (overlap_add(taps, strides, (h, w), padding),)


window_max_pool.defvjp(_window_max_pool_fwd, _window_max_pool_bwd)
