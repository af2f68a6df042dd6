"""The optimizer of a run: Adam (the original), AdamW or Nesterov SGD with a learning-rate schedule, nothing for
the frozen leaves; built for the CPU, `cifarjax.cpu.fusion`'s (optax's arithmetic, bit for bit)."""
from __future__ import annotations

from typing import Optional

import jax
import optax

from cifarjax.cpu import fusion as cpu_optimizers
from cifarjax.freezing import Freezing
from cifarjax.target import resolve

TRAINABLE, FROZEN = "trainable", "frozen"


def learning_rate(config, steps_per_epoch: int):
    """A float for 'constant' (the original), else an optax schedule: 'cosine' (linear warm-up, cosine decay to 0)
    or 'onecycle' (warm-up over `warmup_epochs`, default 30% of the run)."""
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


def base_optimizer(config, steps_per_epoch: int, platform: Optional[str] = None) -> optax.GradientTransformation:
    """Adam, AdamW (decay on kernels) or Nesterov SGD with L2 decay, built for `platform` (default `resolve()`)."""
    optimizers = cpu_optimizers if resolve(platform) == "cpu" else optax
    rate = learning_rate(config, steps_per_epoch)
    decays = lambda params: jax.tree.map(lambda p: p.ndim > 1, params)  # noqa: E731  kernels, not biases or scales
    if config.optimizer == "adam":
        return optimizers.adam(rate)
    if config.optimizer == "adamw":
        return optimizers.adamw(rate, weight_decay=config.weight_decay, mask=decays)
    return optax.chain(optax.add_decayed_weights(config.weight_decay, mask=decays),
                       optimizers.sgd(rate, config.momentum, nesterov=True))


def make_optimizer(config, params, steps_per_epoch: int = 1, platform: Optional[str] = None
                   ) -> optax.GradientTransformation:
    """The configured optimizer on the trainable leaves; frozen leaves get `set_to_zero` and no state."""
    mask = Freezing.from_config(config).trainable_mask(params)
    labels = jax.tree.map(lambda trains: TRAINABLE if trains else FROZEN, mask)
    return optax.multi_transform({TRAINABLE: base_optimizer(config, steps_per_epoch, platform),
                                  FROZEN: optax.set_to_zero()}, labels)
