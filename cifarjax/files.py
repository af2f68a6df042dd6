"""Safe file writing (`atomic_write`), the cache folder, and the manifest of what cifarjax wrote in a run folder."""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Callable, Iterator, Optional

from cifarjax.errors import os_error_message, warn

MARKER, MANIFEST = ".cifarjax-run", ".cifarjax-files"
_recorded: set = set()
_UMASK = os.umask(0)
os.umask(_UMASK)


def cache_dir() -> Path:
    """The cache folder (decoded datasets, converted weights): $CIFARJAX_CACHE, default ~/.cache/cifarjax."""
    return Path(os.environ.get("CIFARJAX_CACHE", Path.home() / ".cache" / "cifarjax")).expanduser()


@contextlib.contextmanager
def atomic_write(path, mode: str = "w") -> Iterator:
    """Open a unique temporary file beside `path`; on success it replaces `path`, on failure it is removed (a full
    disk never stays full of leftovers)."""
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
    except BaseException as error:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(error, OSError) and error.filename is None:  # a failed write names no file: name it
            raise OSError(error.errno, error.strerror or str(error), str(path)) from error
        raise
    record_output(path)


def run_folder_of(path) -> Optional[Path]:
    """The nearest folder at or above `path`'s parent that cifarjax marked as a run, or None."""
    return next((parent for parent in Path(path).absolute().parents if (parent / MARKER).is_file()), None)


def record_output(path) -> None:
    """List `path` (a file or folder cifarjax wrote) in the manifest of the run folder holding it, so that
    --overwrite removes exactly what cifarjax wrote."""
    run = run_folder_of(path)
    if run is None or Path(path).name in (MARKER, MANIFEST):
        return
    entry = Path(path).absolute().relative_to(run).as_posix()
    if (run, entry) not in _recorded and entry not in read_manifest(run):
        with open(run / MANIFEST, "a") as f:
            f.write(entry + "\n")
    _recorded.add((run, entry))


def beside_foreign(path) -> Path:
    """`path`, or where a user's file (one the manifest does not list) takes that name in a run folder, the first
    free or cifarjax's own name beside it: NAME-2.png, NAME-3.png ... (a run without a manifest: `path`)."""
    path = Path(path)
    run = run_folder_of(path)
    listed = set(read_manifest(run)) if run is not None else set()
    candidate, n = path, 1
    while listed and candidate.exists() and candidate.absolute().relative_to(run).as_posix() not in listed:
        n += 1
        candidate = path.with_name(f"{path.stem}-{n}{path.suffix}")
    return candidate


def read_manifest(run) -> list:
    """The paths (relative to `run`) its manifest lists; a line cut by a crash is ignored."""
    try:
        text = (Path(run) / MANIFEST).read_text()
    except FileNotFoundError:
        return []
    lines = text.split("\n")
    return [line for line in (lines if text.endswith("\n") else lines[:-1]) if line]


def write_text(path, text: str) -> None:
    with atomic_write(path) as f:
        f.write(text)


def write_json(path, value) -> None:
    write_text(path, json.dumps(value, indent=2) + "\n")


def best_effort(action: Callable, what: str, fallback=None):
    """Run a cache operation; where the file system refuses (read-only, full), warn once and return `fallback`:
    a cache is a helper, never a blocker."""
    try:
        return action()
    except OSError as error:
        warn(f"{what} skipped ({os_error_message(error)}); continuing without the cache", key=("cache", what))
        return fallback
