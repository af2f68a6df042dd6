"""The CPU's convolutions (`conv2d`: Winograd, im2col or XLA's forward per shape; SimpleCNN's fused `ConvReluMaxPool`):
faster than XLA's CPU convolutions, the same arithmetic up to rounding (measurements: docs/architecture.md)."""
from __future__ import annotations

import math
from functools import partial, reduce
from typing import Optional

import flax.linen as nn
import numpy as np
import jax
import jax.numpy as jnp
from jax import lax

from cifarjax.cpu.fusion import apart, materialize, with_backward
from cifarjax.ops import interleave, overlap_add, torch_uniform, xla_conv

LARGE_MAP = 8  # from this width XLA's forward beats im2col (1.0-4.6x); on 2x2 maps it is far slower
FEW_CHANNELS = 4  # up to this many input channels (images) XLA's kernel gradient beats im2col's (the stem: 2.2x)
F4_FROM = 14  # map width from which `conv3x3_same` uses F(4x4) tiles (below, F(2x2): half the rounding error)
F4_FROM_INFERENCE = 8  # the same where no train-mode BatchNorm amplifies F(4x4)'s rounding
XLA_FORWARD_WIDTHS = range(8, 14)  # undifferentiated 3x3 'same' convolutions of these widths run XLA's forward


def _reached_taps(size: int, k: int, strides: int, padding: int) -> range:
    """The kernel offsets along one axis that meet the input (not only padding) at some output."""
    outputs = (size + 2 * padding - k) // strides + 1
    reached = [i for i in range(k) if any(0 <= o * strides + i - padding < size for o in range(outputs))]
    return range(reached[0], reached[-1] + 1)


def _im2col_conv(x, kernel, strides: int, padding: int):
    """Shifted slices concatenated, then one matmul; taps that meet only padding are left out (all zero)."""
    kh, kw, cin, cout = kernel.shape
    n, h, w, _ = x.shape
    rows, cols = _reached_taps(h, kh, strides, padding), _reached_taps(w, kw, strides, padding)
    if padding:
        x = jnp.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
    ho, wo = (x.shape[1] - kh) // strides + 1, (x.shape[2] - kw) // strides + 1
    span_h, span_w = strides * (ho - 1) + 1, strides * (wo - 1) + 1
    patches = jnp.concatenate([x[:, i:i + span_h:strides, j:j + span_w:strides, :] for i in rows for j in cols], -1)
    taps = kernel[rows.start:rows.stop, cols.start:cols.stop].reshape(len(rows) * len(cols) * cin, cout)
    return (patches.reshape(n * ho * wo, len(rows) * len(cols) * cin) @ taps).reshape(n, ho, wo, cout)


def _xla_im2col_bwd(strides, padding, inputs, dy):
    x, kernel = inputs
    dx, = jax.vjp(lambda x: _im2col_conv(x, kernel, strides, padding), x)[1](dy)
    kernel_conv = _im2col_conv if x.shape[-1] > FEW_CHANNELS else xla_conv
    return dx, jax.vjp(lambda k: kernel_conv(x, k, strides, padding), kernel)[1](dy)[0]


@with_backward(_xla_im2col_bwd, nondiff_argnums=(2, 3))
def xla_forward_im2col_backward(x, kernel, strides: int, padding: int):
    """XLA's convolution (fast forward on large maps) differentiated through im2col (but few channels' kernels)."""
    return xla_conv(x, kernel, strides, padding)


def conv2d(x, kernel, strides: int = 1, padding: int = 0, impl: str = "winograd", inference: bool = False):
    """NHWC x HWIO convolution by 'im2col' or 'winograd' (the fastest per shape); `inference`: larger Winograd tiles."""
    width, winograd = min(x.shape[1], x.shape[2]), impl == "winograd"
    if winograd and (*kernel.shape[:2], strides, padding) == (3, 3, 1, 1):
        return xla_forward_winograd_backward(x, kernel, inference) if width in XLA_FORWARD_WIDTHS else \
            conv3x3_same(x, kernel, inference=inference)
    if winograd and width >= LARGE_MAP:
        return xla_forward_im2col_backward(x, kernel, strides, padding)
    return _im2col_conv(x, kernel, strides, padding)


def conv_phases(x, kernel, pool: int):
    """``{(p, q): conv2d(x)[:, p::pool, q::pool]}`` cropped to what pooling keeps, each phase one im2col matmul."""
    (_, h, w, _), (kh, kw, _, _) = x.shape, kernel.shape
    th, tw = (h - kh + 1) // pool, (w - kw + 1) // pool
    return {(p, q): _im2col_conv(x[:, p:p + pool * (th - 1) + kh, q:q + pool * (tw - 1) + kw], kernel, pool, 0)
            for p in range(pool) for q in range(pool)}


def _maximum_of_bwd(xs, g):
    out = reduce(jnp.maximum, xs)  # recomputed: compiled, as many maximum ops and fusions as when kept
    return tuple(jnp.where(x == out, g, jnp.zeros_like(g)) for x in xs)


@with_backward(_maximum_of_bwd)
def maximum_of(*xs):
    """Elementwise maximum whose gradient goes to every input equal to it (after a ReLU ties are zeros)."""
    return reduce(jnp.maximum, xs)

# Winograd F(m x m, 3x3) (Lavin & Gray 2016), (B^T, G, A^T): out_tile = A^T [(G k G^T) * (B^T d B)] A over
# (m+2)x(m+2) input tiles d at stride m. Exact in float64; float32 computations round them.
WINOGRAD = {
    2: (np.array([[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]], np.float64),
        np.array([[1, 0, 0], [1 / 2, 1 / 2, 1 / 2], [1 / 2, -1 / 2, 1 / 2], [0, 0, 1]], np.float64),
        np.array([[1, 1, 1, 0], [0, 1, -1, -1]], np.float64)),
    4: (np.array([[4, 0, -5, 0, 1, 0], [0, -4, -4, 1, 1, 0], [0, 4, -4, -1, 1, 0], [0, -2, -1, 2, 1, 0],
                  [0, 2, -1, -2, 1, 0], [0, 4, 0, -5, 0, 1]], np.float64),
        np.array([[1 / 4, 0, 0], [-1 / 6, -1 / 6, -1 / 6], [-1 / 6, 1 / 6, -1 / 6], [1 / 24, 1 / 12, 1 / 6],
                  [1 / 24, -1 / 12, 1 / 6], [0, 0, 1]], np.float64),
        np.array([[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0], [0, 1, 1, 4, 4, 0], [0, 1, -1, 8, -8, 1]], np.float64)),
}


def _combine(matrix, xs):
    """[sum_j matrix[i, j] * xs[j] for each row i], skipping zeros and multiplications by +-1."""
    def row_sum(row):
        (c, x), *rest = [(c, x if abs(c) == 1 else abs(c) * x) for c, x in zip(row.tolist(), xs) if c != 0]
        return reduce(lambda acc, term: acc + term[1] if term[0] > 0 else acc - term[1], rest, x if c > 0 else -x)
    return [row_sum(row) for row in np.asarray(matrix)]


def _sandwich(matrix, grid, keep_first_pass: bool = False):
    """matrix @ grid @ matrix^T over a nested list of arrays; `keep_first_pass` materializes grid @ matrix^T."""
    rows = [_combine(matrix, row) for row in grid]
    rows = materialize(rows) if keep_first_pass else rows
    cols = [_combine(matrix, [row[j] for row in rows]) for j in range(len(rows[0]))]
    return [[col[i] for col in cols] for i in range(len(cols[0]))]


def _winograd_input_bwd(m, th, tw, inputs, dv):
    return (overlap_add(materialize(_sandwich(WINOGRAD[m][0].T, dv)), m, inputs[0].shape[1:3]),)


@with_backward(_winograd_input_bwd, nondiff_argnums=(1, 2, 3))
def winograd_input_tiles(x, m: int, th: int, tw: int):
    """B^T d B of the th x tw (m+2)x(m+2) input tiles at stride m, nested lists of (n, th, tw, c); the gradient
    overlap-adds per input phase instead of transposing (m+2)^2 strided slices."""
    t, bt = m + 2, WINOGRAD[m][0]
    # `d B` (db[j]: (n, H, tw, c)) kept in memory first: fused, each tile re-read up to 16 slices was 1.2x slower
    db = materialize(_combine(bt, [x[:, :, b:b + m * (tw - 1) + 1:m, :] for b in range(t)]))
    columns = [_combine(bt, [col[:, a:a + m * (th - 1) + 1:m] for a in range(t)]) for col in db]
    return [[col[i] for col in columns] for i in range(t)]


def _winograd_kernel_bwd(m, _, du):
    taps = _sandwich(WINOGRAD[m][1].T, du)  # G^T du G
    return (materialize(jnp.stack([jnp.stack(row) for row in taps])),)


@with_backward(_winograd_kernel_bwd, nondiff_argnums=(1,))
def winograd_kernel(kernel, m: int):
    """G k G^T as nested lists of (cin, cout) arrays; the gradient assembled once (autodiff pads taps per consumer)."""
    return _sandwich(WINOGRAD[m][1], [[kernel[i, j] for j in range(3)] for i in range(3)])


def _tile_products(v, u):
    """[[v[a][b] @ u[a][b]]]: the Winograd-domain products of input tiles and kernels."""
    n, th, tw, cin = v[0][0].shape
    return [[(va.reshape(n * th * tw, cin) @ ua).reshape(n, th, tw, ua.shape[-1]) for va, ua in zip(vrow, urow)]
            for vrow, urow in zip(v, u)]


def _winograd_products_bwd(m, th, tw, inputs, dp):
    x, u = inputs
    # recomputed, not the forward's kept alive; x's first element is padding, which XLA folds, dp's is data
    v = apart(lambda x: winograd_input_tiles(x, m, th, tw), x, witness=dp)
    dv, du = jax.vjp(_tile_products, v, u)[1](dp)
    return _winograd_input_bwd(m, th, tw, (x,), dv)[0], du


@with_backward(_winograd_products_bwd, nondiff_argnums=(2, 3, 4))
def winograd_products(x, u, m: int, th: int, tw: int):
    """`_tile_products` of x's input tiles and u, the gradient recomputing the tiles (F(4x4)'s: 2.25x x's size)."""
    return _tile_products(winograd_input_tiles(materialize(x), m, th, tw), u)


def winograd_phases(x, kernel, m: int, th: int, tw: int, keep_tiles: bool = True):
    """The unpadded 3x3 convolution's th x tw m x m output tiles by phase (y[i][j]: outputs (m*t + i, m*u + j))."""
    u = winograd_kernel(kernel, m)  # G k G^T
    prods = _tile_products(winograd_input_tiles(materialize(x), m, th, tw), u) if keep_tiles else \
        winograd_products(x, u, m, th, tw)  # the same products, B^T d B recomputed for the gradient
    # F(4x4)'s outputs each combine up to 25 products, F(2x2)'s 9 (two passes measured slower there)
    return materialize(_sandwich(WINOGRAD[m][2], prods, keep_first_pass=m == 4))


def _whole_map_bwd(inputs, dy):
    x, kernel = inputs
    n, h, w, cin = x.shape
    dx = whole_map_conv3x3(dy, jnp.flip(kernel, (0, 1)).swapaxes(2, 3))
    products = (x.reshape(n, h * w * cin).T @ dy.reshape(n, -1)).reshape(h, w, cin, h, w, -1)  # [p, q, :, i, j, :]
    zero = jnp.zeros_like(kernel[0, 0])  # the taps that meet only padding
    taps = [[sum((products[p, q, :, i, j] for p in range(h) for q in range(w) for i in range(h) for j in range(w)
                  if (p - i + 1, q - j + 1) == (a, b)), zero) for b in range(3)] for a in range(3)]
    return dx, jnp.stack([jnp.stack(row) for row in taps])


@with_backward(_whole_map_bwd)
def whole_map_conv3x3(x, kernel):
    """``conv2d(x, kernel, 1, 1)`` of maps at most 2x2, each output (and gradient) one matmul of the whole map."""
    n, h, w, cin = x.shape
    if h > 2 or w > 2:
        raise ValueError(f"whole-map convolution is for maps of at most 2x2, got {h}x{w}")
    outputs = [lax.dot_general(x, kernel[1 - i:1 - i + h, 1 - j:1 - j + w], (((1, 2, 3), (0, 1, 2)), ((), ())))
               for i in range(h) for j in range(w)]
    return jnp.stack(outputs, axis=1).reshape(n, h, w, -1)


def conv3x3_same(x, kernel, tile: Optional[int] = None, inference: bool = False):
    """``conv2d(x, kernel, 1, 1)``, 3x3: whole maps up to 2x2, Winograd F(4x4) from `F4_FROM` wide, else F(2x2)."""
    n, h, w, cin = x.shape
    if h <= 2 and w <= 2 and tile is None:
        return whole_map_conv3x3(x, kernel)
    m = tile or (4 if min(h, w) >= (F4_FROM_INFERENCE if inference else F4_FROM) else 2)
    th, tw = -(-h // m), -(-w // m)
    x = jnp.pad(x, ((0, 0), (1, m * th + 1 - h), (1, m * tw + 1 - w), (0, 0)))
    return interleave(winograd_phases(x, kernel, m, th, tw, keep_tiles=m == 2))[:, :h, :w, :]


@partial(jax.custom_vjp, nondiff_argnums=(2,))
def xla_forward_winograd_backward(x, kernel, inference: bool = False):
    """``conv3x3_same(x, kernel)`` by XLA's convolution where undifferentiated, else by `conv3x3_same` both ways."""
    return xla_conv(x, kernel, 1, 1)


xla_forward_winograd_backward.defvjp(
    lambda x, kernel, inference: jax.vjp(lambda x, kernel: conv3x3_same(x, kernel, inference=inference), x, kernel),
    lambda inference, vjp, dy: vjp(dy))


def conv3x3_maxpool(x, kernel, pool: int, tile: Optional[int] = None):
    """``max_pool(conv2d(x, kernel), pool)``, unpadded 3x3, even pool: Winograd on the tiles pooling keeps (`tile`:
    F(4x4) where 2x2 of them fit), the pool a maximum over output phases."""
    if pool % 2:
        raise ValueError(f"Winograd pooling needs an even pool, got {pool}")
    (n, h, w, _), cout = x.shape, kernel.shape[-1]
    kept_h, kept_w = (h - 2) // pool * pool, (w - 2) // pool * pool
    big_tiles = kept_h % 4 == 0 and kept_w % 4 == 0 and kept_h * kept_w >= 64 and (pool % 4 == 0 or 4 % pool == 0)
    m = tile or (4 if big_tiles else 2)
    th, tw = kept_h // m, kept_w // m
    y, group, k = winograd_phases(x, kernel, m, th, tw), min(pool, m), max(1, m // pool)  # k x k pools per tile
    out = interleave([[maximum_of(*[y[group * u + i][group * v + j] for i in range(group) for j in range(group)])
                       for v in range(k)] for u in range(k)])
    if pool > m:
        r = pool // m
        out = out.reshape(n, th // r, r, tw // r, r, cout).max(axis=(2, 4))
    return out


class ConvReluMaxPool(nn.Module):
    """``max_pool(relu(conv3x3(x) + bias), pool)`` fused, `layers.Conv`'s parameters; `method` 'winograd' or 'phases'
    (the ReLU's outputs zeroed where a boolean `keep` mask of the whole convolution's shape is False, e.g. dropout's;
    unscaled: the caller divides by the keep probability)."""
    features: int
    pool: int
    method: str = "winograd"

    @nn.compact
    def __call__(self, x, keep=None):
        shape, s = (3, 3, x.shape[-1], self.features), self.pool
        kernel = self.param("kernel", torch_uniform, shape)
        bias = self.param("bias", partial(torch_uniform, fan_in=math.prod(shape[:-1])), (self.features,))
        if self.method == "winograd":
            if keep is not None:
                raise ValueError("the Winograd path pools before the ReLU and cannot apply `keep`")
            return nn.relu(conv3x3_maxpool(x, kernel, s) + bias)
        masked = lambda z, p, q: z if keep is None else jnp.where(  # noqa: E731  the phase's part of `keep`
            keep[:, p:p + s * (z.shape[1] - 1) + 1:s, q:q + s * (z.shape[2] - 1) + 1:s, :], z, jnp.zeros_like(z))
        return maximum_of(*[masked(nn.relu(z + bias), p, q) for (p, q), z in conv_phases(x, kernel, s).items()])
