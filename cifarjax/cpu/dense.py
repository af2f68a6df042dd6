"""The CPU's linear layer: a model built for the CPU passes `dense_transposed_backward` to its `Dense` layers
(`cifarjax.layers.Dense.linear`)."""
from __future__ import annotations

import jax

from cifarjax.cpu.fusion import materialize


@jax.custom_vjp
def dense_transposed_backward(x, kernel, bias):
    """`x @ kernel + bias`, whose kernel gradient multiplies a transposed copy of x by the output gradient g.

    XLA's CPU product x^T g, which contracts both operands' leading (batch) axis, ran 1.7-2.3x slower for a
    10-class head (batch 64-512, 512 features) than the copy and a plain product together, and 1.05-1.15x slower
    for SimpleCNN's 256-to-512 layer. (For im2col's much taller kernel gradients the copy is the slower one.)"""
    return x @ kernel + bias


def _dense_fwd(x, kernel, bias):
    return x @ kernel + bias, (x, kernel, bias)


def _dense_bwd(residuals, g):
    x, kernel, bias = residuals
    rows_x, rows_g = x.reshape(-1, x.shape[-1]), g.reshape(-1, g.shape[-1])
    dkernel = materialize(rows_x.T) @ rows_g
    return ((g @ kernel.T).astype(x.dtype), dkernel.astype(kernel.dtype), rows_g.sum(0).astype(bias.dtype))


dense_transposed_backward.defvjp(_dense_fwd, _dense_bwd)
