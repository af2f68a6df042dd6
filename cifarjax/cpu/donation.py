"""The CPU's donation: a training step donates only its frozen parameters (`frozen_apart`), which it returns
in place; XLA's CPU copy insertion copies every donated buffer the step rewrites (1.15-1.26x slower)."""
from __future__ import annotations

from functools import partial

import jax


def frozen_apart(step, mask, axis_name: str, devices: list, **static):
    """`step` pmap-ed with the parameters `mask` leaves frozen donated (a separate argument) and every parameter
    differentiated (the CPU's recorded numerics), called like the plain step; without a mask nothing is donated."""
    if mask is None:
        return jax.pmap(partial(step, trainable=None, **static), axis_name=axis_name, devices=devices)
    frozen, treedef = [not t for t in jax.tree.leaves(mask)], jax.tree.structure(mask)

    def split(state):  # (its frozen parameters, the state holding only its training parameters), both as lists
        leaves = jax.tree.leaves(state.params)
        kept = [p for p, f in zip(leaves, frozen) if f]
        return kept, state.replace(params=[p for p, f in zip(leaves, frozen) if not f])

    def join(kept, state):  # `split`'s inverse
        kept, training = iter(kept), iter(state.params)
        return state.replace(params=jax.tree.unflatten(treedef, [next(kept) if f else next(training) for f in frozen]))

    def apart(kept, state, *args):
        new_state, metrics = step(join(kept, state), *args, trainable=mask, differentiate_frozen=True, **static)
        return *split(new_state), metrics

    pmapped = jax.pmap(apart, axis_name=axis_name, devices=devices, donate_argnums=(0,))

    def call(state, *args):
        kept, rest, metrics = pmapped(*split(state), *args)
        return join(kept, rest), metrics
    call.lower = lambda state, *args: pmapped.lower(*split(state), *args)
    return call
