"""The optimizer of a run: Adam (the original), AdamW or Nesterov SGD with a learning-rate schedule, nothing for
the frozen leaves: optax's, on the CPU with `cifarjax.cpu.fusion`'s moments (optax's arithmetic, bit for bit)."""
from __future__ import annotations

from functools import partial
from typing import Optional

import jax
import optax

from cifarjax.cpu import fusion
from cifarjax.freezing import Freezing
from cifarjax.target import resolve


def learning_rate(config, steps_per_epoch: int):
    """A float for 'constant', else optax's 'cosine' (warm-up, decay to 0) or 'onecycle' (default warm-up: 30%)."""
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
    """Adam, AdamW (decay on kernels) or Nesterov SGD (L2 decay), chained as optax's; the CPU's with fused moments."""
    cpu = resolve(platform) == "cpu"
    rate = optax.scale_by_learning_rate(learning_rate(config, steps_per_epoch))
    kernels = lambda params: jax.tree.map(lambda p: p.ndim > 1, params)  # noqa: E731  not biases or BatchNorm scales
    decay = optax.add_decayed_weights(config.weight_decay, mask=kernels)
    if config.optimizer == "sgd":
        momentum = (fusion.nesterov_momentum if cpu else partial(optax.trace, nesterov=True))(config.momentum)
        return optax.chain(decay, optax.chain(momentum, rate))  # L2 decay before optax.sgd's chain
    adam = fusion.scale_by_adam() if cpu else optax.scale_by_adam()
    return optax.chain(adam, decay, rate) if config.optimizer == "adamw" else optax.chain(adam, rate)


def make_optimizer(config, params, steps_per_epoch: int = 1, platform: Optional[str] = None
                   ) -> optax.GradientTransformation:
    """The configured optimizer on the trainable leaves; frozen leaves get `set_to_zero` and no state."""
    mask = Freezing.from_config(config).trainable_mask(params)
    labels = jax.tree.map(lambda trains: "trainable" if trains else "frozen", mask)
    return optax.multi_transform({"trainable": base_optimizer(config, steps_per_epoch, platform),
                                  "frozen": optax.set_to_zero()}, labels)
