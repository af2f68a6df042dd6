"""cifarjax: train and fine-tune CIFAR-10 classifiers in JAX/Flax (docs/example.py). The public names (`__all__`,
docs/api.md) load on first use (PEP 562), so `import cifarjax` starts neither JAX nor PyTorch."""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

_HOMES = {name: module for module, names in (  # public name -> its module, in docs/api.md's order
    ("config", "Config"), ("recipes", "recipe_config RECIPES"), ("data", "load_dataset train_val_split Dataset Split"),
    ("models", "build_model init_variables"), ("pretrained", "imagenet_resnet18"), ("export", "export_torchvision"),
    ("loop", "train_loop fine_tune_loop fit FitResult"), ("inputs", "ImageInputs"), ("augment", "AugmentSpec"),
    ("cpu.process", "tune_process"), ("records", "over_seeds mean_sd"),
    ("predictor", "evaluate predict probabilities score format_table load_run Run"),
    ("plots", "plot_training_results plot_runs plot_confusion_matrix plot_sample_predictions"),
    ("study", "fine_tune_study Cell DEFAULT_GRID"), ("errors", "UserError")) for name in names.split()}
_RENAMED = {"fine_tune_study": "study"}  # `cifarjax.study` names the module, so its one-call function is renamed

__all__ = list(_HOMES)


def __getattr__(name: str):
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'cifarjax' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"cifarjax.{home}"), _RENAMED.get(name, name))
    globals()[name] = value
    return value


def __dir__():  # the public names and the module's own dunders, not its imports
    return sorted(set(__all__) | {name for name in globals() if name.startswith("__")})
