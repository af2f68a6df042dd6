"""Layers whose numerics match PyTorch and whose CPU formulation is fast.

* `Conv`: a convolution with symmetric padding and PyTorch's default initialisation. On CPU it runs as
  im2col (shifted slices concatenated, then one matmul), which XLA executes faster than its own CPU
  convolution; on GPU it uses XLA's convolution (cuDNN).
* `BatchNorm`: PyTorch's BatchNorm2d (running variance updated with the unbiased batch variance), with
  optional synchronisation across devices.
* `Dropout`: inverted dropout whose mask comes from a counter-based integer hash seeded by the PRNG key;
  on CPU this is ~50x cheaper than drawing threefry bits for every activation.
* `max_pool`: max pooling as reshape+max (non-overlapping windows) or as a max of strided slices.
"""
from __future__ import annotations

import math
from typing import Optional

import jax
import jax.numpy as jnp
import flax.linen as nn
from jax import lax

CONV_IMPLS = ("auto", "im2col", "xla")


def _torch_uniform(key, shape, dtype=jnp.float32):
    """PyTorch's default Conv2d/Linear weight init: U(-1/sqrt(fan_in), 1/sqrt(fan_in)), fan_in = prod(shape[:-1])."""
    fan_in = math.prod(shape[:-1])
    bound = 1.0 / math.sqrt(fan_in)
    return jax.random.uniform(key, shape, dtype, -bound, bound)


def _torch_bias_init(fan_in: int):
    bound = 1.0 / math.sqrt(fan_in)
    return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound)


def resolve_conv_impl(impl: str) -> str:
    """'auto' means im2col on CPU and XLA's convolution elsewhere."""
    if impl not in CONV_IMPLS:
        raise ValueError(f"conv impl must be one of {CONV_IMPLS}, got {impl!r}")
    if impl == "auto":
        return "im2col" if jax.default_backend() == "cpu" else "xla"
    return impl


def conv2d(x, kernel, strides: int = 1, padding: int = 0, impl: str = "auto"):
    """NHWC x HWIO convolution with symmetric zero padding, as im2col+matmul or XLA's convolution."""
    kh, kw, cin, cout = kernel.shape
    if resolve_conv_impl(impl) == "xla":
        return lax.conv_general_dilated(x, kernel, (strides, strides), [(padding, padding)] * 2,
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))
    if padding:
        x = jnp.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
    n, h, w, _ = x.shape
    ho, wo = (h - kh) // strides + 1, (w - kw) // strides + 1
    span_h, span_w = strides * (ho - 1) + 1, strides * (wo - 1) + 1
    patches = [x[:, i:i + span_h:strides, j:j + span_w:strides, :] for i in range(kh) for j in range(kw)]
    patches = patches[0] if len(patches) == 1 else jnp.concatenate(patches, axis=-1)
    y = patches.reshape(n * ho * wo, kh * kw * cin) @ kernel.reshape(kh * kw * cin, cout)
    return y.reshape(n, ho, wo, cout)


class Conv(nn.Module):
    """2-D convolution, square kernel, symmetric padding (PyTorch semantics), NHWC."""
    features: int
    kernel_size: int
    strides: int = 1
    padding: int = 0
    use_bias: bool = True
    impl: str = "auto"
    kernel_init: Optional[callable] = None

    @nn.compact
    def __call__(self, x):
        cin = x.shape[-1]
        shape = (self.kernel_size, self.kernel_size, cin, self.features)
        kernel = self.param("kernel", self.kernel_init or _torch_uniform, shape)
        y = conv2d(x, kernel, self.strides, self.padding, self.impl)
        if self.use_bias:
            y = y + self.param("bias", _torch_bias_init(math.prod(shape[:-1])), (self.features,))
        return y


class Dense(nn.Module):
    """Fully connected layer with PyTorch's default initialisation (kernel stored as (in, out))."""
    features: int

    @nn.compact
    def __call__(self, x):
        kernel = self.param("kernel", _torch_uniform, (x.shape[-1], self.features))
        bias = self.param("bias", _torch_bias_init(x.shape[-1]), (self.features,))
        return x @ kernel + bias


class BatchNorm(nn.Module):
    """PyTorch BatchNorm2d: eps 1e-5, momentum 0.1, running_var updated with the unbiased variance.

    `use_running_average=True` is inference mode. With `axis_name`, batch statistics are computed over
    the whole batch across devices (synchronised BatchNorm), so N devices match one device exactly.
    """
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
            mean, var = ra_mean.value, ra_var.value
        else:
            axes = tuple(range(x.ndim - 1))
            count = math.prod(x.shape[:-1])
            synced = self.axis_name is not None and not self.is_initializing()
            mean = x.mean(axes)
            if synced:
                mean = lax.pmean(mean, self.axis_name)
            var = jnp.square(x - mean).mean(axes)
            if synced:
                var = lax.pmean(var, self.axis_name)
                count = count * lax.psum(1, self.axis_name)
            if not self.is_initializing():
                unbiased = var * (count / (count - 1))
                ra_mean.value = (1 - self.momentum) * ra_mean.value + self.momentum * mean
                ra_var.value = (1 - self.momentum) * ra_var.value + self.momentum * unbiased
        return (x - mean) * lax.rsqrt(var + self.epsilon) * scale + bias


def hash_uniform_bits(key, shape):
    """uint32 bits per element from a counter hash (lowbias32) seeded by one draw from `key`."""
    seed = jax.random.bits(key, (), jnp.uint32)
    size = math.prod(shape)
    h = lax.iota(jnp.uint32, size).reshape(shape) * jnp.uint32(0x9E3779B9) + seed
    h = h ^ (h >> 16)
    h = h * jnp.uint32(0x7FEB352D)
    h = h ^ (h >> 15)
    h = h * jnp.uint32(0x846CA68B)
    return h ^ (h >> 16)


class Dropout(nn.Module):
    """Inverted dropout (zero with probability `rate`, scale the rest by 1/(1-rate)); needs the 'dropout' rng."""
    rate: float

    @nn.compact
    def __call__(self, x, deterministic: bool):
        if deterministic or self.rate == 0.0:
            return x
        threshold = jnp.uint32(min(int(round(self.rate * 2**32)), 2**32 - 1))
        keep = hash_uniform_bits(self.make_rng("dropout"), x.shape) >= threshold
        return jnp.where(keep, x / (1.0 - self.rate), jnp.zeros_like(x))


def max_pool(x, window: int, strides: Optional[int] = None, padding: int = 0):
    """Max pooling (PyTorch MaxPool2d semantics: floor output size, padding counts as -inf), NHWC."""
    strides = strides or window
    if strides == window and padding == 0:
        n, h, w, c = x.shape
        ho, wo = h // window, w // window
        x = x[:, :ho * window, :wo * window, :]
        return x.reshape(n, ho, window, wo, window, c).max(axis=(2, 4))
    if padding:
        x = jnp.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)), constant_values=-jnp.inf)
    n, h, w, c = x.shape
    ho, wo = (h - window) // strides + 1, (w - window) // strides + 1
    span_h, span_w = strides * (ho - 1) + 1, strides * (wo - 1) + 1
    out = None
    for i in range(window):
        for j in range(window):
            s = x[:, i:i + span_h:strides, j:j + span_w:strides, :]
            out = s if out is None else jnp.maximum(out, s)
    return out
