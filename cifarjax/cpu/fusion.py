"""Fusion boundaries for XLA's CPU compiler, which the model's layers and the optimizer both need."""
from __future__ import annotations

import jax
from jax import lax


def materialize(tree):
    """`tree` unchanged, but computed once into memory rather than recomputed inside each consumer fusion."""
    return apart(lambda t: t, tree)


def apart(fn, tree, witness=None):
    """`fn(tree)` inside a conditional: computed into memory and never merged with the same computation elsewhere.

    XLA's CPU fusion recomputes cheap producers in every consumer, and `lax.optimization_barrier` does not stop it
    (expanded before fusion); a conditional does. Its predicate reads the first element of `witness` (default:
    `tree`'s first leaf) and must be data (XLA removes a foldable one); the second branch, differing in form so
    XLA cannot merge them, runs only on a NaN, where adding zero changes nothing.
    """
    first = jax.tree.leaves(tree if witness is None else witness)[0].ravel()[0]
    return lax.cond(first == first, fn, lambda t: fn(jax.tree.map(lambda v: v + 0, t)), tree)
