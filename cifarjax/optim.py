"""The optimizer of a run: Adam (the original), AdamW or SGD with Nesterov momentum, a learning-rate schedule,
and the frozen part of the model (`optax.multi_transform` over `Freezing.trainable_mask`: frozen leaves get
`set_to_zero` and no optimizer state).

Built for the CPU, the same optimizers come from `cifarjax.cpu.optim` (optax's arithmetic, bit for bit, with
the moments computed once into memory); elsewhere they are optax's own.
"""
from __future__ import annotations

from typing import Optional

import jax
import optax

from cifarjax.cpu import optim as cpu_optimizers
from cifarjax.freezing import Freezing
from cifarjax.target import resolve

TRAINABLE, FROZEN = "trainable", "frozen"


def learning_rate(config, steps_per_epoch: int):
    """The learning rate: a float for 'constant' (the original), else an optax schedule over the run's steps.

    'cosine': linear warm-up from 0 over `warmup_epochs`, then cosine decay to 0.
    'onecycle': cosine rise from lr/25 to lr over `warmup_epochs` (default 30% of the run), then cosine decay
    to lr/25e4 (optax.cosine_onecycle_schedule).
    """
    total = max(1, config.n_epochs * steps_per_epoch)
    warmup = int(round(config.warmup_epochs * steps_per_epoch))
    if config.schedule == "constant":
        return config.lr
    if config.schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(0.0, config.lr, warmup, total, end_value=0.0)
    pct_start = min(warmup / total, 0.99) if warmup else 0.3
    return optax.cosine_onecycle_schedule(total, config.lr, pct_start=pct_start)


def lr_at(config, steps_per_epoch: int, step: int) -> float:
    rate = learning_rate(config, steps_per_epoch)
    return float(rate(step)) if callable(rate) else float(rate)


def _decays(params):
    """Weight decay applies to kernels, not to biases or BatchNorm scales."""
    return jax.tree.map(lambda p: p.ndim > 1, params)


def base_optimizer(config, steps_per_epoch: int, platform: Optional[str] = None) -> optax.GradientTransformation:
    """Adam (optax.adam), AdamW (optax.adamw, decay on kernels) or SGD with Nesterov momentum and L2 decay; built
    for the CPU (`platform`, default `cifarjax.target.resolve()`), `cifarjax.cpu.optim`'s (the same arithmetic
    and state)."""
    optimizers = cpu_optimizers if resolve(platform) == "cpu" else optax
    rate = learning_rate(config, steps_per_epoch)
    if config.optimizer == "adam":
        return optimizers.adam(rate)
    if config.optimizer == "adamw":
        return optimizers.adamw(rate, weight_decay=config.weight_decay, mask=_decays)
    return optax.chain(optax.add_decayed_weights(config.weight_decay, mask=_decays),
                       optimizers.sgd(rate, config.momentum, nesterov=True))


def make_optimizer(config, params, steps_per_epoch: int = 1, platform: Optional[str] = None
                   ) -> optax.GradientTransformation:
    """The configured optimizer on the trainable leaves, built for `platform` (default:
    `cifarjax.target.resolve()`); frozen leaves get `set_to_zero` and no state."""
    mask = Freezing.from_config(config).trainable_mask(params)
    labels = jax.tree.map(lambda trains: TRAINABLE if trains else FROZEN, mask)
    return optax.multi_transform({TRAINABLE: base_optimizer(config, steps_per_epoch, platform),
                                  FROZEN: optax.set_to_zero()}, labels)
