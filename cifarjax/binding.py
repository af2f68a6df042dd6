"""What a run is bound to, recorded in its config.json: its data folder and weights file as absolute paths, its
data's fingerprint (`data.fingerprint`) and its weights file's SHA-256; a mismatch is refused naming the change."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

from cifarjax.errors import UserError

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
    for key, names in (("data_dir", ()), ("weights", NAMED_WEIGHTS)):
        if values.get(key) not in (None, *names) and str(values[key]).strip():
            values[key] = absolute(values[key])
    return values


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


def check_weights(recorded: Optional[str], now: Optional[str], path, run, needed_for: str) -> None:
    """Refuse a weights file that is not the one the run started from, where the run still needs it."""
    if recorded is None or recorded == now:
        return
    state = "is missing" if now is None else \
        f"changed since the run started (sha256 {now[:12]} now, {recorded[:12]} then)"
    raise UserError(f"the weights file {path} {state}, and {needed_for} needs the run's starting weights: restore "
                    "the original file, or start a new run")
