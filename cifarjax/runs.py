"""The run folder: config.json, metrics.jsonl (one JSON object per evaluation), summary.json, plots/,
checkpoints/, tensorboard/, the `.cifarjax-run` marker that says cifarjax made the folder, the manifest
`.cifarjax-files` of every file cifarjax wrote there, and `.cifarjax-lock` while a process uses it.

A user's files are never touched: `check_out` decides, before anything is written, whether --out may be
used (a new or empty folder, a run to resume, or with --overwrite a folder cifarjax marked as a run, and
never one a live process holds), and `create` makes or replaces the folder only after the new run has
started successfully, removing exactly the files its manifest lists (a folder only once it is empty).
"""
from __future__ import annotations

import atexit
import functools
import json
import os
import re
import shutil
import socket
import time
import uuid
from pathlib import Path
from typing import Iterable, Optional

import cifarjax
from cifarjax import errors
from cifarjax.config import Config
from cifarjax.errors import UserError, user_error_from_os, warn
from cifarjax.files import MANIFEST, MARKER, atomic_write, read_manifest, write_json

CONFIG, METRICS, SUMMARY, PLOTS = "config.json", "metrics.jsonl", "summary.json", "plots"
TENSORBOARD, LOCK = "tensorboard", ".cifarjax-lock"
# Runs made before the manifest (2026-12-04): their top-level files cifarjax wrote, and in its folders the
# entries it names this way; a folder is removed only once nothing else is left in it.
OWN_FILES = (CONFIG, METRICS, SUMMARY, "frozen_params.npz", "study.json", "study.md")
OWN_IN_FOLDERS = {PLOTS: ("*.png",), TENSORBOARD: ("events.out.tfevents.*",),
                  "checkpoints": ("[0-9]*", "*.orbax-checkpoint-tmp*")}


def default_run_dir(experiment: str) -> Path:
    return Path("runs") / f"{experiment}-{time.strftime('%Y%m%d-%H%M%S')}"


def run_name(run: Path) -> str:
    """How figures name a run: its folder's name, with its parent's for one length of a fine-tune (`X/epochs-20`)."""
    run = Path(run).resolve()
    return f"{run.parent.name}/{run.name}" if re.fullmatch(r"epochs-\d+", run.name) else run.name


def is_run(folder: Path) -> bool:
    """Whether cifarjax marked `folder` as one of its run folders."""
    return (Path(folder) / MARKER).is_file()


def marker(folder: Path) -> dict:
    try:
        return json.loads((Path(folder) / MARKER).read_text())
    except (OSError, ValueError):
        return {}


def _file_above(path: Path) -> Optional[Path]:
    for parent in [path, *path.parents]:
        if parent.exists() and not parent.is_dir():
            return parent
    return None


def check_out(out, experiment: str, overwrite: bool = False, resume: bool = False) -> Path:
    """The run folder for --out, checked before anything is written; raises UserError when it may not be used."""
    if overwrite and resume:
        raise UserError("--overwrite and --resume contradict each other; pass one of them")
    if resume and out is None:
        raise UserError("--resume needs --out RUN: the folder of the run to continue")
    run = Path(out).expanduser() if out is not None else default_run_dir(experiment)
    blocker = _file_above(run)
    if blocker == run:
        raise UserError(f"--out {run} is a file; choose a folder path")
    if blocker is not None:
        raise UserError(f"--out {run} lies below the file {blocker}; choose a folder path")
    try:
        holds_files = run.is_dir() and any(run.iterdir())
    except OSError as error:
        raise user_error_from_os(error, f"cannot read --out {run}") from None
    if resume:
        if not holds_files:
            raise UserError(f"--resume needs an existing run folder, and {run} is empty or missing; check the "
                            "path, or leave out --resume to start a new run there")
        if not is_run(run):
            raise UserError(f"{run} is not a cifarjax run folder (it has no {MARKER} marker); pass the --out "
                            "folder of a run to resume")
    elif holds_files:
        if not is_run(run):
            raise UserError(f"{run} holds files that cifarjax did not create (it has no {MARKER} marker), so it "
                            "will not write there or replace it; choose another --out")
        if not overwrite:
            raise UserError(f"run folder {run} already holds a run; pass --resume to continue it, --overwrite to "
                            "replace it, or choose another --out")
    if holds_files:
        check_unlocked(run)
        check_no_links(run)
    return run


def check_outside_data(run: Path, data_dir) -> None:
    """Refuse a run folder inside the data folder the run reads (None: CIFAR-10 in the cache): its folders would be
    read as data (a `test/` split, a class) by every later run on it."""
    if not data_dir or not str(data_dir).strip():
        return
    data = os.path.realpath(Path(data_dir).expanduser())  # not Path.resolve: a symbolic link loop is refused later
    if Path(os.path.realpath(Path(run).expanduser())).is_relative_to(data):
        raise UserError(f"--out {run} lies inside the data folder {data_dir}, where its files would become part of "
                        "the data; choose an --out outside it")


def check_no_links(run: Path) -> None:
    """Refuse a run folder whose own subfolders (plots/, tensorboard/, checkpoints/) are symbolic links: cifarjax
    would write, and on --overwrite replace files, in a folder it did not create."""
    for name in OWN_IN_FOLDERS:
        if (run / name).is_symlink():
            raise UserError(f"{run / name} is a symbolic link (to {os.readlink(run / name)}); cifarjax writes its "
                            f"{name} there and will not write through a link into a folder it did not create: "
                            "replace the link with a folder, or choose another --out")


def claim(run: Path) -> None:
    """A run folder research code passed (`fit(run=...)`): made and marked as cifarjax's when it is new or empty;
    refused when it holds files cifarjax did not create. A command's folder, already checked and marked, passes."""
    run = Path(run)
    if is_run(run):
        check_no_links(run)
        return
    try:
        foreign = run.exists() and (not run.is_dir() or any(run.iterdir()))
    except OSError as error:
        raise user_error_from_os(error, f"cannot read the run folder {run}") from None
    if foreign:
        raise UserError(f"{run} holds files that cifarjax did not create (it has no {MARKER} marker), so it will "
                        "not write there; pass a new or empty run folder")


def create(run: Path, experiment: str, replace: bool = False, take_lock: bool = False) -> Path:
    """Make the run folder and its marker; with `take_lock`, first lock it for this process (refused while
    another live process holds it); with `replace`, then remove an old run's own files (never others)."""
    marker = {"experiment": experiment, "id": uuid.uuid4().hex, "cifarjax": cifarjax.__version__,
              "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}  # before anything is made
    try:
        run.mkdir(parents=True, exist_ok=True)
        if take_lock:
            lock(run)
        if replace and is_run(run):
            remove_run_files(run)
        if not is_run(run):
            write_json(run / MARKER, marker)
        (run / PLOTS).mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise user_error_from_os(error, f"cannot create the run folder {run}") from None
    return run


def remove_run_files(run: Path) -> None:
    """Remove exactly what cifarjax wrote in a marked run folder (the files its manifest lists, marked sub-runs,
    orbax's unfinished checkpoints), then the folders left empty; anything else stays, and is named."""
    run = Path(run)
    for entry in _own_entries(run):
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        elif entry.exists() or entry.is_symlink():
            entry.unlink()
    for sub in [e for e in run.iterdir() if e.is_dir() and not e.is_symlink() and is_run(e)]:
        remove_run_files(sub)
        _remove_if_empty(sub)
    folders = {run / name for name in OWN_IN_FOLDERS} | {
        run / parent for e in read_manifest(run) for parent in Path(e).parents if parent != Path(".")}
    for folder in sorted(folders, key=lambda p: -len(p.parts)):
        if folder.is_dir() and not folder.is_symlink():
            _remove_if_empty(folder)
    for name in (MANIFEST, MARKER):
        if (run / name).is_file():
            (run / name).unlink()
    kept = sorted(p.relative_to(run).as_posix() for p in run.rglob("*") if p.name != LOCK and not p.is_dir())
    if kept:
        more = f" and {len(kept) - 5} more" if len(kept) > 5 else ""
        warn(f"--overwrite kept {', '.join(kept[:5])}{more} in {run}: cifarjax did not create them")


def _own_entries(run: Path) -> list:
    """What cifarjax wrote in `run`: its manifest's paths (never one outside the folder), else (a run made before
    the manifest) the names cifarjax gives its files; orbax's unfinished checkpoints in either case."""
    listed = read_manifest(run)
    inside = run.resolve()
    entries = [run / e for e in listed if not Path(e).is_absolute() and ".." not in Path(e).parts
               and Path(e).name not in (MANIFEST, MARKER)
               and (run / e).parent.resolve().is_relative_to(inside)]  # not through a link out of the run
    if not listed:
        entries = [run / name for name in OWN_FILES]
        entries += [p for folder, patterns in OWN_IN_FOLDERS.items() if (run / folder).is_dir()
                    for pattern in patterns for p in (run / folder).glob(pattern)]
    entries += list((run / "checkpoints").glob("*.orbax-checkpoint-tmp*")) if (run / "checkpoints").is_dir() else []
    return entries


def _remove_if_empty(folder: Path) -> None:
    try:
        folder.rmdir()
    except OSError:
        pass


# ---------------------------------------------------------------------------------------------- the lock

def _lock_holder(run: Path) -> Optional[dict]:
    """The live process holding `run` ({'host', 'pid'}), or None (no lock, this process's own, or a stale one:
    this host's process that is gone)."""
    try:
        holder = json.loads((Path(run) / LOCK).read_text())
        host, pid = str(holder["host"]), int(holder["pid"])
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError):
        return None  # a lock cut by a crash while it was written: its process never started the run
    if host != socket.gethostname():
        return {"host": host, "pid": pid}
    if pid == os.getpid():
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        pass
    return {"host": host, "pid": pid}


def check_unlocked(run: Path) -> None:
    """Refuse a run folder that a live process is using (its lock names the host and process)."""
    holder = _lock_holder(run)
    if holder is None:
        return
    if holder["host"] == socket.gethostname():
        raise UserError(f"run folder {run} is in use by process {holder['pid']} on this machine; wait for it to "
                        f"finish or stop it (kill {holder['pid']}: it saves a checkpoint), then try again")
    raise UserError(f"run folder {run} is in use by process {holder['pid']} on host {holder['host']} (its lock "
                    f"{Path(run) / LOCK}); wait for it, or if that process is gone delete that file and try again")


def lock(run: Path) -> None:
    """Mark `run` as used by this process until it exits (a stale lock is replaced, a live one refused)."""
    check_unlocked(run)
    path = Path(run) / LOCK
    try:  # not through atomic_write: the lock is no output, so the manifest does not list it
        path.write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                                    "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}))
    except OSError as error:
        raise user_error_from_os(error, f"cannot lock the run folder {run}") from None
    release = functools.partial(unlock, path.absolute(), os.getpid())
    atexit.register(release)
    errors.at_command_end.append(release)


def unlock(path: Path, pid: int) -> None:
    """Remove the lock at `path` if this process `pid` still holds it."""
    try:
        if json.loads(Path(path).read_text()).get("pid") == pid == os.getpid():
            Path(path).unlink()
    except (OSError, ValueError, AttributeError):
        pass


# config.json's keys beside the Config fields (cifarjax.binding, experiments.finetune), each with what it must be.
RECORDED = {"data_fingerprint": ("an object with sha256 and images", lambda v: isinstance(v, dict) and
                                 isinstance(v.get("sha256"), str) and isinstance(v.get("images"), dict)),
            "commands": ("a list of strings", lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v)),
            "epoch_counts": ("a list of integers", lambda v: isinstance(v, list) and v and
                             all(isinstance(x, int) and not isinstance(x, bool) for x in v)),
            "frozen_params": ("an object with path and sha256", lambda v: isinstance(v, dict) and
                              isinstance(v.get("path"), str) and isinstance(v.get("sha256"), str)),
            **{k: ("a string", lambda v: isinstance(v, str)) for k in ("weights_label", "weights_file",
                                                                       "weights_sha256")}}


def read_config(run) -> dict:
    """A run's config.json, every value's type checked (`Config.from_dict` for the settings, `RECORDED` for the
    rest): a hand-edited file is refused in one line naming the file and the key."""
    path = Path(run) / CONFIG
    saved = read_json(path)
    Config.from_dict(saved, str(path))
    wrong = next((k for k, (_, fits) in RECORDED.items() if saved.get(k) is not None and not fits(saved[k])), None)
    if wrong is not None:
        raise UserError(f"{path}: {wrong} must be {RECORDED[wrong][0]}, got {saved[wrong]!r}; correct it or start "
                        "the run again")
    return saved


def read_json(path: Path):
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise UserError(f"{path} is missing; is {Path(path).parent} a cifarjax run folder?") from None
    except ValueError as error:
        raise UserError(f"{path} is not valid JSON ({error}); restore it from the run's checkpoint metadata or "
                        "start the run again") from None


def write_metrics(run: Path, records: Iterable[dict]) -> None:
    """Rewrite metrics.jsonl with `records` (used at start and on resume, to match the checkpoint)."""
    with atomic_write(run / METRICS) as f:
        f.write("".join(json.dumps(r) + "\n" for r in records))


def append_metrics(run: Path, record: dict) -> None:
    with open(run / METRICS, "a") as f:
        f.write(json.dumps(record) + "\n")


def read_metrics(run) -> list:
    """The records of a metrics.jsonl (`run`: a run folder or the file itself); [] when there is none yet.

    A last line cut by a crash mid-write is left out with a warning; a damaged line before it is a UserError
    naming the line."""
    path = Path(run)
    path = path / METRICS if path.is_dir() else path
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        return []
    except OSError as error:
        raise user_error_from_os(error, f"cannot read {path}") from None
    except UnicodeDecodeError:
        raise UserError(f"{path} is not text; is it a cifarjax metrics.jsonl?") from None
    records, numbered = [], [(i, line) for i, line in enumerate(lines, 1) if line.strip()]
    for i, line in numbered:
        try:
            record = json.loads(line)
            if not isinstance(record, dict):
                raise ValueError("not a JSON object")
        except ValueError as error:
            if i == numbered[-1][0]:
                warn(f"the last line of {path} is incomplete (the run stopped while writing it); it is left out")
                break
            raise UserError(f"line {i} of {path} is not a metrics record ({error}); restore the file or resume the "
                            "run, which rewrites it from its checkpoint") from None
        records.append(record)
    return records
