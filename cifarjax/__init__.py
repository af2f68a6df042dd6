"""cifarjax: train and fine-tune CIFAR-10 classifiers in pure-functional JAX/Flax (`import cifarjax as cj`:
docs/example.py). The public names (`__all__`, docs/api.md) load from their modules on first use (PEP 562), so
`import cifarjax` itself starts neither JAX nor PyTorch.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

_HOMES = {  # public name -> the module that defines it, in docs/api.md's order
    # configuration
    "Config": "config", "recipe_config": "recipes", "RECIPES": "recipes",
    # data
    "load_dataset": "data", "train_val_split": "data", "Dataset": "data", "Split": "data",
    # models and weights
    "build_model": "models", "init_variables": "models", "imagenet_resnet18": "pretrained",
    "export_torchvision": "export",
    # training
    "train_loop": "loop", "fine_tune_loop": "loop", "fit": "loop", "FitResult": "loop", "ImageInputs": "inputs",
    "AugmentSpec": "augment", "tune_process": "cpu.process", "over_seeds": "records", "mean_sd": "records",
    # evaluation
    "evaluate": "predictor", "predict": "predictor", "probabilities": "predictor", "score": "predictor",
    "format_table": "predictor",
    # finished runs
    "load_run": "predictor", "Run": "predictor",
    # figures
    "plot_training_results": "plots", "plot_runs": "plots", "plot_confusion_matrix": "plots",
    "plot_sample_predictions": "plots",
    # the study
    "fine_tune_study": "study", "Cell": "study", "DEFAULT_GRID": "study",
    # errors
    "UserError": "errors",
}
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
