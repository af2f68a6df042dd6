"""The cache folder (decoded datasets, converted weights) and its writes; safe file writing is `cifarjax.runs`'s,
which lists what it writes in a run folder's manifest."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

from cifarjax.errors import os_error_message, warn
from cifarjax.runs import atomic_write, write_json, write_text  # noqa: F401 - the writers, for the cache's users


def cache_dir() -> Path:
    """The cache folder (decoded datasets, converted weights): $CIFARJAX_CACHE, default ~/.cache/cifarjax."""
    return Path(os.environ.get("CIFARJAX_CACHE", Path.home() / ".cache" / "cifarjax")).expanduser()


def best_effort(action: Callable, what: str, fallback=None):
    """Run a cache operation; where the file system refuses (read-only, full), warn once and return `fallback`:
    a cache is a helper, never a blocker."""
    try:
        return action()
    except OSError as error:
        warn(f"{what} skipped ({os_error_message(error)}); continuing without the cache", key=("cache", what))
        return fallback
