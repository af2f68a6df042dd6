"""A trained ResNet-18 run as a torchvision `state_dict`, the inverse of the port (`cifarjax.pretrained`), with the
weights the run evaluates with; in `model.eval()` it gives the run's probabilities on the run's input (image size,
[0, 1] scaling, normalisation). `num_batches_tracked` is 0: with a BatchNorm momentum set PyTorch never reads it."""
from __future__ import annotations

from pathlib import Path
from typing import Union

import numpy as np
from flax import traverse_util

from cifarjax import torchlib
from cifarjax.errors import UserError
from cifarjax.pretrained import _TORCH_AXES, _torch_key
from cifarjax.predictor import Run, load_run
from cifarjax.runs import atomic_write


def torchvision_state_dict(variables: dict) -> dict:
    """{torchvision key: float32 numpy array in PyTorch's layout} of ResNet-18 `variables`."""
    flat = traverse_util.flatten_dict({c: variables[c] for c in ("params", "batch_stats")})
    state = {}
    for key, value in flat.items():
        name, value = _torch_key(key), np.asarray(value, np.float32)
        state[name] = np.ascontiguousarray(np.transpose(value, np.argsort(_TORCH_AXES[value.ndim])))  # the port undone
        if name.endswith("running_mean"):
            state[name.replace("running_mean", "num_batches_tracked")] = np.array(0, np.int64)
    return state


def export_torchvision(run: Union[str, Path, Run], out: Union[str, Path]) -> Path:
    """Write a ResNet-18 run (a folder or a `Run`) to `out`, never an existing file, as a torchvision state_dict."""
    loaded = run if isinstance(run, Run) else load_run(run)
    if loaded.config.model != "resnet18":
        raise UserError(f"{loaded.path} is a {loaded.config.model} run; export writes torchvision ResNet-18 weights, "
                        "so pass a run of experiments.finetune (or a ResNet-18 train_loop run)")
    out = Path(out).expanduser()
    if out.exists() or out.is_symlink():
        raise UserError(f"{out} already exists; export never replaces a file: pass a new path")
    if not out.parent.is_dir():
        raise UserError(f"the folder {out.parent} does not exist; create it or pass a path in an existing folder")
    torch = torchlib.load("torch")
    state = {k: torch.from_numpy(v) for k, v in torchvision_state_dict(loaded.variables).items()}
    with atomic_write(out, "wb") as f:
        torch.save(state, f)
    return out
