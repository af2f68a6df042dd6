"""The CPU's donation: a training step donates only its frozen parameters (`frozen_apart`), which it returns
in place; XLA's CPU copy insertion copies every donated buffer the step rewrites (1.15-1.26x slower)."""
from __future__ import annotations

from functools import partial

import jax


def _split_params(state, frozen: tuple):
    """(the state holding only its training parameters, its frozen parameters), both as lists."""
    leaves = jax.tree.leaves(state.params)
    return (state.replace(params=[p for p, f in zip(leaves, frozen) if not f]),
            [p for p, f in zip(leaves, frozen) if f])


def _join_params(state, frozen_params, frozen: tuple, treedef):
    """`_split_params`'s inverse: `treedef` is the parameter tree's structure."""
    training, kept = iter(state.params), iter(frozen_params)
    return state.replace(params=jax.tree.unflatten(treedef, [next(kept) if f else next(training) for f in frozen]))


def frozen_apart(step, mask, axis_name: str, devices: list, **static):
    """`step` pmap-ed with the parameters `mask` leaves frozen donated (a separate argument) and every parameter
    differentiated (the CPU's recorded numerics), called like the plain step; without a mask nothing is donated."""
    if mask is None:
        return jax.pmap(partial(step, trainable=None, **static), axis_name=axis_name, devices=devices)
    static["differentiate_frozen"] = True
    leaves, treedef = jax.tree.leaves(mask), jax.tree.structure(mask)
    frozen = tuple(not t for t in leaves)

    def apart(frozen_params, state, *args):
        new_state, metrics = step(_join_params(state, frozen_params, frozen, treedef), *args, trainable=mask, **static)
        rest, kept = _split_params(new_state, frozen)
        return kept, rest, metrics

    pmapped = jax.pmap(apart, axis_name=axis_name, devices=devices, donate_argnums=(0,))

    def call(state, *args):
        rest, kept = _split_params(state, frozen)
        kept, rest, metrics = pmapped(kept, rest, *args)
        return _join_params(rest, kept, frozen, treedef), metrics

    def lower(state, *args):
        rest, kept = _split_params(state, frozen)
        return pmapped.lower(kept, rest, *args)
    call.lower = lower
    return call
