"""Named recipes: reviewable presets of `Config` values over its defaults, each with its command and expected result.
Flags override a recipe; a recipe's warm-up scales with another --epochs (3 of 20 epochs become 0.45 of 3)."""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from types import MappingProxyType
from typing import Mapping

from cifarjax.config import Config
from cifarjax.errors import UserError


class FrozenChanges:
    """A frozen dataclass whose `changes` (Config field -> value) are a read-only copy: presets stay as defined."""

    def __post_init__(self):
        object.__setattr__(self, "changes", MappingProxyType(dict(self.changes)))


@dataclass(frozen=True)
class Recipe(FrozenChanges):
    name: str
    summary: str
    changes: Mapping = field(default_factory=dict)  # over Config's defaults
    expected: str = ""  # the command and the result it should give, as measured (docs/results.md)


CNN_ORIGINAL = Recipe(
    "original",
    "The original project: 20 epochs, batch 64, Adam 1e-3 at a constant rate, random flips, dropout 0.3, "
    "inputs scaled to [0, 1].",
    {"model": "simple_cnn"},
    "python -m experiments.cnn --data-dir DIR: about 70% validation accuracy after 20 epochs (69.6%, 70.4% and "
    "71.7% for seeds 0, 1, 2 on the shared CIFAR-10 JPEGs; the PyTorch original 71.4% in one run on the seed-0 "
    "split).")

CNN_IMPROVED = Recipe(
    "improved",
    "The same SimpleCNN (same layers, same 1,025,546 parameters, no BatchNorm) trained better in the same 20 "
    "epochs: dropout 0.1 instead of 0.3, pad-and-random-crop by 4 and flips, dataset mean/std normalisation, "
    "AdamW with weight decay 0.05, a one-cycle learning rate peaking at 2e-3, label smoothing 0.1, an "
    "exponential moving average of the weights (0.999) and test-time flip averaging. Everything runs on the "
    "device, jitted.",
    {"model": "simple_cnn", "dropout": 0.1, "crop_padding": 4, "normalize": "dataset", "optimizer": "adamw",
     "weight_decay": 0.05, "lr": 2e-3, "schedule": "onecycle", "warmup_epochs": 3.0, "label_smoothing": 0.1,
     "ema_decay": 0.999, "tta_flip": True, "eval_every": 0},
    "python -m experiments.cnn --recipe improved --data-dir DIR: about 82.7% validation accuracy after 20 "
    "epochs (82.5%, 82.9% and 82.9% for seeds 0, 1, 2 on the shared CIFAR-10 JPEGs, final epoch, on the validation "
    "images the recipe was chosen on; 79.2% with --dropout 0.3, the original's rate; docs/results.md).")

FINETUNE_ORIGINAL = Recipe(
    "original",
    "The original fine-tune: torchvision's ImageNet ResNet-18, backbone frozen, new head, Adam 1e-3, batch 64, "
    "32x32 inputs in [0, 1] without normalisation, 20, 50 and 100 epochs. As in the original's model.train(), "
    "the frozen backbone's BatchNorm normalises with each batch's statistics and updates its running averages "
    "(momentum 0.1) while the head trains; validation uses the running averages.",
    {"model": "resnet18", "unfreeze": "head", "bn": "train", "eval_every": 0, "weights": "imagenet"},
    "python -m experiments.finetune --data-dir DIR --weights resnet18-f37072fd.pth (ImageNet weights cannot be "
    "downloaded on this project's machines: no ImageNet figure exists; docs/results.md has the stand-in "
    "backbone's).")

FINETUNE_FROZEN_BN = Recipe(
    "frozen-bn",
    "The original fine-tune with one change: the frozen backbone's BatchNorm runs in inference mode (its running "
    "averages, never updated), so the whole backbone is a fixed function of the image and its features are "
    "computed once (each image as is and mirrored) and cached: the head then trains on cached features, many "
    "times faster than the original, which runs the backbone forward at every step.",
    {"model": "resnet18", "unfreeze": "head", "bn": "frozen", "eval_every": 0, "weights": "imagenet"},
    "python -m experiments.finetune --recipe frozen-bn --data-dir DIR --weights FILE (docs/results.md).")

RECIPES = {"cnn": {r.name: r for r in (CNN_ORIGINAL, CNN_IMPROVED)},
           "finetune": {r.name: r for r in (FINETUNE_ORIGINAL, FINETUNE_FROZEN_BN)}}


def recipe_config(command: str, name: str = "original", **overrides) -> Config:
    """Config's defaults, then the recipe's (its warm-up scaled to an overridden n_epochs), then `overrides`."""
    if command not in RECIPES:
        raise UserError(f"recipes are for {' or '.join(map(repr, RECIPES))}, got {command!r}")
    known = RECIPES[command]
    if name not in known:
        raise UserError(f"unknown recipe {name!r} for experiments.{command}; choose one of {', '.join(known)}")
    changes = dict(known[name].changes)
    if changes.get("warmup_epochs") and "n_epochs" in overrides and "warmup_epochs" not in overrides:
        length = changes.get("n_epochs", Config().n_epochs)
        changes["warmup_epochs"] = changes["warmup_epochs"] * overrides["n_epochs"] / length
    unknown = sorted(set(overrides) - {f.name for f in fields(Config)})
    if unknown:
        raise UserError(f"Config has no setting {', '.join(unknown)}; see help(cifarjax.Config) for its fields")
    return Config(**{**changes, **overrides, "recipe": name})
