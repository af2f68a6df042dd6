"""The optimizer of a run: Adam (the original), AdamW or SGD with Nesterov momentum, a learning-rate schedule,
and the frozen part of the model (`optax.multi_transform` over `Freezing.trainable_mask`: frozen leaves get
`set_to_zero` and no optimizer state).

Adam's moments and SGD's momentum are optax's, bit for bit, but computed once into memory before the update
reads them (`scale_by_adam`, `nesterov_momentum`): XLA's CPU fusion otherwise recomputes them inside the
fusion that forms each update. ResNet-18's step at 32x32 ran 1.09x faster with everything training, 1.07x
with layer4 training (and more where the old state is donated, which then had to be copied first).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from cifarjax.fusion import materialize
from cifarjax.freezing import Freezing

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


def rate_depends_on_length(config) -> bool:
    """Whether the learning rate at a step depends on the number of epochs (every schedule but 'constant'):
    when it does not, a run's first epochs are those of the same run made shorter."""
    return config.schedule != "constant"


def lr_at(config, steps_per_epoch: int, step: int) -> float:
    rate = learning_rate(config, steps_per_epoch)
    return float(rate(step)) if callable(rate) else float(rate)


def _decays(params):
    """Weight decay applies to kernels, not to biases or BatchNorm scales."""
    return jax.tree.map(lambda p: p.ndim > 1, params)


def scale_by_adam(b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8) -> optax.GradientTransformation:
    """`optax.scale_by_adam(b1, b2, eps)` with its new moments computed once (the module's docstring)."""
    def update(grads, state, params=None):
        del params
        mu, nu = materialize((optax.tree.update_moment(grads, state.mu, b1, 1),
                              optax.tree.update_moment_per_elem_norm(grads, state.nu, b2, 2)))
        count = optax.safe_increment(state.count)
        updates = jax.tree.map(lambda m, v: m / (jnp.sqrt(v) + eps), optax.tree.bias_correction(mu, b1, count),
                               optax.tree.bias_correction(nu, b2, count))
        return updates, optax.ScaleByAdamState(count=count, mu=mu, nu=nu)
    return optax.GradientTransformation(optax.scale_by_adam(b1, b2, eps).init, update)


def nesterov_momentum(decay: float) -> optax.GradientTransformation:
    """`optax.trace(decay, nesterov=True)` with its new trace computed once (the module's docstring)."""
    def update(grads, state, params=None):
        del params
        trace = materialize(jax.tree.map(lambda g, t: g + decay * t, grads, state.trace))
        return jax.tree.map(lambda g, t: g + decay * t, grads, trace), optax.TraceState(trace=trace)
    return optax.GradientTransformation(optax.trace(decay, nesterov=True).init, update)


def base_optimizer(config, steps_per_epoch: int) -> optax.GradientTransformation:
    """Adam (optax.adam), AdamW (optax.adamw, decay on kernels) or SGD with Nesterov momentum and L2 decay."""
    rate = learning_rate(config, steps_per_epoch)
    if config.optimizer == "adam":
        return optax.chain(scale_by_adam(), optax.scale_by_learning_rate(rate))
    if config.optimizer == "adamw":
        return optax.chain(scale_by_adam(), optax.add_decayed_weights(config.weight_decay, mask=_decays),
                           optax.scale_by_learning_rate(rate))
    return optax.chain(optax.add_decayed_weights(config.weight_decay, mask=_decays),  # optax.sgd's nesting
                       optax.chain(nesterov_momentum(config.momentum), optax.scale_by_learning_rate(rate)))


def freeze_labels(params, freezing: Freezing):
    """'trainable'/'frozen' per parameter leaf, from the freezing policy."""
    return jax.tree.map(lambda trains: TRAINABLE if trains else FROZEN, freezing.trainable_mask(params))


def make_optimizer(config, params, steps_per_epoch: int = 1) -> optax.GradientTransformation:
    """The configured optimizer on the trainable leaves; frozen leaves get `set_to_zero` and no state."""
    return optax.multi_transform({TRAINABLE: base_optimizer(config, steps_per_epoch), FROZEN: optax.set_to_zero()},
                                 freeze_labels(params, Freezing.from_config(config)))
