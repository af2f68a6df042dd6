"""Fusion boundaries for XLA's CPU compiler, which the model's layers and the optimizer both need."""
from __future__ import annotations

import jax
from jax import lax


def materialize(tree):
    """`tree` unchanged, but computed once into memory rather than recomputed inside each consumer fusion.

    XLA's CPU fusion re-evaluates cheap elementwise producers inside every consumer: for the Winograd
    transforms that repeats most of the arithmetic, for an optimizer's new moments the moment updates (and
    where the old moments are donated, it copies them first, as the recomputation still reads them).
    `lax.optimization_barrier` does not stop it (the CPU compiler expands barriers before fusion); a
    conditional does, in the forward pass and, transposed, in the backward pass. Its predicate is data-dependent
    so it cannot be folded, and its branches differ in form (XLA would merge identical ones) but both return
    `tree`: the second runs only when the first element is NaN, and adding zero changes nothing there.
    """
    return apart(lambda t: t, tree)


def apart(fn, tree, witness=None):
    """`fn(tree)` computed inside a conditional (`materialize`'s): into memory, and never merged with the same
    computation elsewhere in the program, as XLA's common-subexpression elimination would otherwise do with a
    value recomputed on purpose (it would keep the first one alive instead).

    The predicate reads the first element of `witness` (default: `tree`'s first leaf). It must be data: where
    XLA can fold it (the first element of a zero-padded map is a constant zero) it removes the conditional.
    """
    first = jax.tree.leaves(tree if witness is None else witness)[0].ravel()[0]
    return lax.cond(first == first, fn, lambda t: fn(jax.tree.map(lambda v: v + 0, t)), tree)
