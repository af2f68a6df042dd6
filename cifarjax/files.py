"""Safe file writing and the cache folder.

* `atomic_write`: write to a temporary file unique to this process and thread, then rename it into place;
  on any failure the temporary file is removed, so a full disk never stays full of leftovers.
* `cache_dir`: `$CIFARJAX_CACHE`, default `~/.cache/cifarjax` (decoded datasets, converted weights).
* `best_effort`: caches are helpers, never blockers; a read-only, full or broken cache warns once and the
  run continues without it.
"""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Callable, Iterator

from cifarjax.errors import os_error_message, warn


_UMASK = os.umask(0)
os.umask(_UMASK)


def cache_dir() -> Path:
    """The cache folder: $CIFARJAX_CACHE, default ~/.cache/cifarjax."""
    return Path(os.environ.get("CIFARJAX_CACHE", Path.home() / ".cache" / "cifarjax")).expanduser()


@contextlib.contextmanager
def atomic_write(path, mode: str = "w") -> Iterator:
    """Open a unique temporary file beside `path`; on success it replaces `path`, on failure it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes it private; the result is an ordinary file
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def write_text(path, text: str) -> None:
    with atomic_write(path) as f:
        f.write(text)


def write_json(path, value) -> None:
    write_text(path, json.dumps(value, indent=2) + "\n")


def best_effort(action: Callable, what: str, fallback=None):
    """Run a cache operation; if the file system refuses (read-only, full, unreadable), warn once and return
    `fallback`."""
    try:
        return action()
    except OSError as error:
        warn(f"{what} skipped ({os_error_message(error)}); continuing without the cache", key=("cache", what))
        return fallback
