"""Which parts of a model train, decided once: the optimizer's mask, the BatchNorm modes, whether features are fixed
and what a moving average keeps all derive from one list of patterns over parameter paths (big_vision's style)."""
from __future__ import annotations

import re
from dataclasses import dataclass
from functools import partial

import jax
from flax import traverse_util

# --unfreeze value -> patterns (full match) of '/'-joined parameter paths that train.
TRAINABLE_RULES = {"head": (r"head/.*",), "layer4": (r"head/.*", r"backbone/layer4_.*"), "all": (r".*",)}
# ResNet stages in order, each with a parameter path that belongs to it.
STAGES = (("stem", "backbone/conv1/kernel"),) + tuple(
    (f"layer{i}", f"backbone/layer{i}_block0/conv1/kernel") for i in range(1, 5))
_name = partial(jax.tree_util.keystr, simple=True, separator="/")  # a key path as 'backbone/layer1_block0/conv1/kernel'


def split_frozen(params, trainable):
    """(trainable part, frozen part) of a parameter tree, as nested dicts."""
    flat, mask = traverse_util.flatten_dict(params), traverse_util.flatten_dict(trainable)
    parts = ({k: v for k, v in flat.items() if mask[k]}, {k: v for k, v in flat.items() if not mask[k]})
    return tuple(traverse_util.unflatten_dict(p) for p in parts)


def join_frozen(trainable_part, frozen_part):
    """One tree of both parts' leaves (`trainable_part`'s where both hold one)."""
    return traverse_util.unflatten_dict({**traverse_util.flatten_dict(frozen_part),
                                         **traverse_util.flatten_dict(trainable_part)})


def leaves_like(tree, part):
    """`tree`'s leaves at the paths `part` holds, as a tree shaped like `part`."""
    flat = traverse_util.flatten_dict(tree)
    return traverse_util.unflatten_dict({k: flat[k] for k in traverse_util.flatten_dict(part)})


@dataclass(frozen=True)
class Freezing:
    trainable: tuple = TRAINABLE_RULES["all"]  # patterns of parameter paths that train
    bn_frozen: bool = True  # frozen stages' BatchNorm runs in inference mode (False: PyTorch's train mode)

    @classmethod
    def from_config(cls, config) -> "Freezing":
        return cls(TRAINABLE_RULES[config.unfreeze], config.bn == "frozen")

    def trains(self, name: str) -> bool:
        return any(re.fullmatch(p, name) for p in self.trainable)

    def trainable_mask(self, params):
        """A pytree of bools over `params`: True where the parameter trains."""
        return jax.tree_util.tree_map_with_path(lambda path, _: self.trains(_name(path)), params)

    @property
    def everything_trains(self) -> bool:
        return self.trainable == TRAINABLE_RULES["all"]

    @property
    def frozen_bn_stages(self) -> int:
        """How many leading ResNet stages (stem, layer1..4) keep BatchNorm in inference mode while training."""
        first_trained = next((i for i, (_, sample) in enumerate(STAGES) if self.trains(sample)), len(STAGES))
        return first_trained if self.bn_frozen else 0

    def averaged(self, variables) -> dict:
        """What training changes, which a moving average of the weights keeps: the trainable parameters and the
        statistics of BatchNorm layers in train mode."""
        stats = variables.get("batch_stats", {})
        stage = lambda name: int(re.match(r"backbone/layer(\d+)_|", name).group(1) or 0)  # noqa: E731  0: the stem
        updated = jax.tree_util.tree_map_with_path(lambda path, _: stage(_name(path)) >= self.frozen_bn_stages, stats)
        return {"params": split_frozen(variables["params"], self.trainable_mask(variables["params"]))[0],
                "batch_stats": split_frozen(stats, updated)[0]}

    @property
    def backbone_fixed(self) -> bool:
        """No backbone parameter or statistic changes, so features are a fixed function of the image."""
        return self.frozen_bn_stages == len(STAGES)
