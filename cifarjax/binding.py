"""What a run is bound to, recorded in its config.json and checked before it is resumed or evaluated.

A run records its data folder and weights file as absolute paths, a fingerprint of its data (`data.fingerprint`:
what the seeded split depends on), the SHA-256 of its weights file, and every command that made or resumed it.
A mismatch is refused in one line naming what changed; the same images in another folder are the same data.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

from cifarjax.errors import UserError

MODEL_NAMES = {"simple_cnn": "SimpleCNN", "resnet18": "ResNet-18"}
COMMAND_MODELS = {"cnn": "simple_cnn", "finetune": "resnet18"}
NAMED_WEIGHTS = ("imagenet", "random")


def absolute(path) -> Optional[str]:
    """`path` as an absolute path (None stays None), so that a run means the same folder from any folder."""
    if path is None:
        return None
    try:
        return str(Path(path).expanduser().resolve())
    except (OSError, RuntimeError):  # a symbolic link loop: the loader names it
        return os.path.abspath(os.path.expanduser(path))


def absolute_paths(values: dict) -> dict:
    """Config values with data_dir and a weights file made absolute ('imagenet' and 'random' stay names)."""
    values = dict(values)
    if values.get("data_dir") is not None and str(values["data_dir"]).strip():
        values["data_dir"] = absolute(values["data_dir"])
    if values.get("weights") not in (None, *NAMED_WEIGHTS) and str(values["weights"]).strip():
        values["weights"] = absolute(values["weights"])
    return values


def record(saved: Optional[dict], data_fingerprint: dict, command_line: str) -> dict:
    """config.json's binding: the data's fingerprint (the run's own, once it started) and every command that
    made or resumed the run, oldest first."""
    saved = saved or {}
    return {"data_fingerprint": saved.get("data_fingerprint") or data_fingerprint,
            "commands": [*saved.get("commands", []), command_line]}


def check_data(saved: dict, now: dict, data_dir, run,
               fix: str = "pass the run's own data with --data-dir, or start a new run") -> None:
    """Refuse data that differs from the run's (another folder with the same images is fine)."""
    then = saved.get("data_fingerprint")
    if not then or then["sha256"] == now["sha256"]:
        return
    n_now, n_then = sum(now["images"].values()), sum(then["images"].values())
    change = (f"{n_now} images now, {n_then} when the run started" if n_now != n_then else
              f"{n_now} images as when the run started, but not the same ones")
    raise UserError(f"the data in {data_dir} differs from the run's in {run} ({change}; fingerprint "
                    f"{now['sha256'][:12]} now, {then['sha256'][:12]} then): {fix}")


def check_command(saved: dict, experiment: Optional[str], command: str, run) -> None:
    """Refuse to resume a run with a command that trains another model (cnn of a fine-tune, or the reverse)."""
    model, wanted = saved.get("model"), COMMAND_MODELS.get(command)
    made_by = experiment if experiment in COMMAND_MODELS else \
        next((c for c, m in COMMAND_MODELS.items() if m == model), None)
    if wanted is None or (model == wanted and made_by in (None, command)):
        return
    maker = f"experiments.{made_by or experiment}"
    raise UserError(f"the run in {run} is a {MODEL_NAMES.get(model, model)} run made by {maker}, and "
                    f"experiments.{command} trains a {MODEL_NAMES[wanted]}: resume it with python -m {maker} "
                    f"--resume --out {run}")


def check_weights(recorded: Optional[str], now: Optional[str], path, run, needed_for: str) -> None:
    """Refuse a weights file that is not the one the run started from, where the run still needs it."""
    if recorded is None or recorded == now:
        return
    state = "is missing" if now is None else \
        f"changed since the run started (sha256 {now[:12]} now, {recorded[:12]} then)"
    raise UserError(f"the weights file {path} {state}, and {needed_for} needs the run's starting weights: restore "
                    "the original file, or start a new run")
