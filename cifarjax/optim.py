"""Adam with a frozen part: `optax.multi_transform` over labels computed from parameter paths."""
from __future__ import annotations

import jax
import optax

TRAINABLE, FROZEN = "trainable", "frozen"


def _is_trainable(path, unfreeze: str) -> bool:
    names = [getattr(k, "key", str(k)) for k in path]
    if unfreeze == "all" or names[0] != "backbone":
        return True
    return unfreeze == "layer4" and names[1].startswith("layer4")


def freeze_labels(params, unfreeze: str = "all"):
    """'trainable'/'frozen' per leaf: 'head' trains only the head (the original), 'layer4' also the
    backbone's layer4, 'all' everything. Models without a 'backbone' are fully trainable."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: TRAINABLE if _is_trainable(path, unfreeze) else FROZEN, params)


def make_optimizer(params, lr: float, unfreeze: str = "all") -> optax.GradientTransformation:
    """Adam(lr) on the trainable leaves; frozen leaves get `set_to_zero` and no optimizer state."""
    return optax.multi_transform({TRAINABLE: optax.adam(lr), FROZEN: optax.set_to_zero()},
                                 freeze_labels(params, unfreeze))
