"""The run folder: config.json, metrics.jsonl, summary.json, plots/, checkpoints/, tensorboard/, the marker
`.cifarjax-run` (cifarjax made it), the manifest `.cifarjax-files` (what cifarjax wrote) and `.cifarjax-lock`.

A user's files are never touched: `check_out` decides before anything is written whether --out may be used, and
`create` makes or replaces the folder only once the new run has started, removing only what the manifest lists.
"""
from __future__ import annotations

import atexit
import contextlib
import functools
import json
import os
import re
import shutil
import socket
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional

import cifarjax
from cifarjax import binding, errors
from cifarjax.config import Config
from cifarjax.errors import UserError, user_error_from_os, warn
from cifarjax.files import MANIFEST, MARKER, atomic_write, read_manifest, write_json  # noqa: F401 - runs.MANIFEST

CONFIG, METRICS, SUMMARY, PLOTS = "config.json", "metrics.jsonl", "summary.json", "plots"
TENSORBOARD, LOCK = "tensorboard", ".cifarjax-lock"
# Runs made before the manifest (2026-12-04): the names cifarjax gave its files there.
OWN_FILES = (CONFIG, METRICS, SUMMARY, "frozen_params.npz", "study.json", "study.md")
OWN_IN_FOLDERS = {PLOTS: ("*.png",), TENSORBOARD: ("events.out.tfevents.*",),
                  "checkpoints": ("[0-9]*", "*.orbax-checkpoint-tmp*")}
MODEL_NAMES = {"simple_cnn": "SimpleCNN", "resnet18": "ResNet-18"}
COMMAND_MODELS = {"cnn": "simple_cnn", "finetune": "resnet18"}
NOT_OURS = "holds files that cifarjax did not create (it has no {} marker), so it will not write there".format(MARKER)


@dataclass
class RunFolder:
    """A command's run folder, checked before anything is written, with the config.json of the run it resumes."""
    path: Path
    experiment: str
    resume: bool = False
    overwrite: bool = False
    saved: Optional[dict] = None

    @classmethod
    def check(cls, out, experiment: str, overwrite: bool = False, resume: bool = False) -> RunFolder:
        path = check_out(out, experiment, overwrite, resume)
        return cls(path, experiment, resume, overwrite, read_config(path) if resume else None)

    def check_command(self, command: str) -> None:
        """Refuse to resume a run with a command that trains another model (cnn of a fine-tune, or the reverse)."""
        model, wanted = self.saved.get("model"), COMMAND_MODELS.get(command)
        experiment = marker(self.path).get("experiment")
        made_by = experiment if experiment in COMMAND_MODELS else \
            next((c for c, m in COMMAND_MODELS.items() if m == model), None)
        if wanted is None or (model == wanted and made_by in (None, command)):
            return
        maker = f"experiments.{made_by or experiment}"
        raise UserError(f"the run in {self.path} is a {MODEL_NAMES.get(model, model)} run made by {maker}, and "
                        f"experiments.{command} trains a {MODEL_NAMES[wanted]}: resume it with python -m {maker} "
                        f"--resume --out {self.path}")

    def check_data(self, now: dict, data_dir) -> None:
        if self.resume:
            binding.check_data(self.saved, now, data_dir, self.path)

    def binding(self, data_fingerprint: dict, command_line: str) -> dict:
        """config.json's binding: the data's fingerprint (the run's own) and every command that made the run."""
        saved = self.saved or {}
        return {"data_fingerprint": saved.get("data_fingerprint") or data_fingerprint,
                "commands": [*saved.get("commands", []), command_line]}

    def open(self, config_json: dict) -> None:
        """Create (or replace) the folder, locked for this process, and write config.json."""
        create(self.path, self.experiment, replace=self.overwrite, take_lock=True)
        write_json(self.path / CONFIG, config_json)


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


def holds_files(folder: Path, doing: str) -> bool:
    """Whether `folder` exists and holds anything (a file counts)."""
    try:
        return folder.exists() and (not folder.is_dir() or any(folder.iterdir()))
    except OSError as error:
        raise user_error_from_os(error, f"cannot read {doing} {folder}") from None


def check_out(out, experiment: str, overwrite: bool = False, resume: bool = False) -> Path:
    """The run folder for --out, checked before anything is written; raises UserError when it may not be used."""
    if overwrite and resume:
        raise UserError("--overwrite and --resume contradict each other; pass one of them")
    if resume and out is None:
        raise UserError("--resume needs --out RUN: the folder of the run to continue")
    run = Path(out).expanduser() if out is not None else Path("runs") / f"{experiment}-{time.strftime('%Y%m%d-%H%M%S')}"
    blocker = next((p for p in [run, *run.parents] if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        raise UserError(f"--out {run} is a file; choose a folder path" if blocker == run else
                        f"--out {run} lies below the file {blocker}; choose a folder path")
    used = holds_files(run, "--out")
    if resume and not used:
        raise UserError(f"--resume needs an existing run folder, and {run} is empty or missing; check the "
                        "path, or leave out --resume to start a new run there")
    if resume and not is_run(run):
        raise UserError(f"{run} is not a cifarjax run folder (it has no {MARKER} marker); pass the --out "
                        "folder of a run to resume")
    if used and not resume and not is_run(run):
        raise UserError(f"{run} {NOT_OURS} or replace it; choose another --out")
    if used and not resume and not overwrite:
        raise UserError(f"run folder {run} already holds a run; pass --resume to continue it, --overwrite to "
                        "replace it, or choose another --out")
    if used:
        check_unlocked(run)
        check_no_links(run)
    return run


def check_outside_data(run: Path, data_dir) -> None:
    """Refuse a run folder inside the data folder the run reads: its folders would be read as data."""
    if not data_dir or not str(data_dir).strip():
        return
    data = os.path.realpath(Path(data_dir).expanduser())  # not Path.resolve: a symbolic link loop is refused later
    if Path(os.path.realpath(Path(run).expanduser())).is_relative_to(data):
        raise UserError(f"--out {run} lies inside the data folder {data_dir}, where its files would become part of "
                        "the data; choose an --out outside it")


def check_no_links(run: Path) -> None:
    """Refuse a run folder whose plots/, tensorboard/ or checkpoints/ is a symbolic link out of it."""
    for name in OWN_IN_FOLDERS:
        if (run / name).is_symlink():
            raise UserError(f"{run / name} is a symbolic link (to {os.readlink(run / name)}); cifarjax writes its "
                            f"{name} there and will not write through a link into a folder it did not create: "
                            "replace the link with a folder, or choose another --out")


def claim(run: Path) -> None:
    """Accept a run folder research code passed (`fit(run=...)`) when it is cifarjax's, new or empty."""
    run = Path(run)
    if is_run(run):
        check_no_links(run)
    elif holds_files(run, "the run folder"):
        raise UserError(f"{run} {NOT_OURS}; pass a new or empty run folder")


def create(run: Path, experiment: str, replace: bool = False, take_lock: bool = False) -> Path:
    """Make the run folder and its marker; with `take_lock` first lock it for this process, with `replace` then
    remove an old run's own files."""
    mark = {"experiment": experiment, "id": uuid.uuid4().hex, "cifarjax": cifarjax.__version__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}  # before anything is made
    try:
        run.mkdir(parents=True, exist_ok=True)
        if take_lock:
            lock(run)
        if replace and is_run(run):
            remove_run_files(run)
        if not is_run(run):
            write_json(run / MARKER, mark)
        (run / PLOTS).mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise user_error_from_os(error, f"cannot create the run folder {run}") from None
    return run


def remove_run_files(run: Path) -> None:
    """Remove exactly what cifarjax wrote in a marked run folder, then the folders left empty; name what stays."""
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
    """What cifarjax wrote in `run`: its manifest's paths inside it (else the names it gives its files), and orbax's
    unfinished checkpoints."""
    listed, inside = read_manifest(run), run.resolve()
    entries = [run / e for e in listed if not Path(e).is_absolute() and ".." not in Path(e).parts
               and Path(e).name not in (MANIFEST, MARKER)
               and (run / e).parent.resolve().is_relative_to(inside)]  # not through a link out of the run
    if not listed:
        entries = [run / name for name in OWN_FILES]
        entries += [p for folder, patterns in OWN_IN_FOLDERS.items() for pattern in patterns
                    for p in (run / folder).glob(pattern)]
    return entries + list((run / "checkpoints").glob("*.orbax-checkpoint-tmp*"))


def _remove_if_empty(folder: Path) -> None:
    with contextlib.suppress(OSError):
        folder.rmdir()


def _lock_holder(run: Path) -> Optional[dict]:
    """The live process holding `run` ({'host', 'pid'}), or None (no lock, this process's own, a stale one)."""
    try:
        holder = json.loads((Path(run) / LOCK).read_text())
        host, pid = str(holder["host"]), int(holder["pid"])
    except (OSError, ValueError, KeyError, TypeError):
        return None  # none, or one cut by a crash while it was written: its process never started the run
    if host == socket.gethostname():
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
    release = functools.partial(_unlock, path.absolute(), os.getpid())
    atexit.register(release)
    errors.at_command_end.append(release)


def _unlock(path: Path, pid: int) -> None:
    """Remove the lock at `path` if this process `pid` still holds it."""
    with contextlib.suppress(OSError, ValueError, AttributeError):
        if json.loads(Path(path).read_text()).get("pid") == pid == os.getpid():
            Path(path).unlink()


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
    """A run's config.json, every value's type checked: a hand-edited file is refused naming the file and key."""
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
    """Rewrite metrics.jsonl with `records` (at start and on resume, to match the checkpoint)."""
    with atomic_write(run / METRICS) as f:
        f.write("".join(json.dumps(r) + "\n" for r in records))


def append_metrics(run: Path, record: dict) -> None:
    with open(run / METRICS, "a") as f:
        f.write(json.dumps(record) + "\n")


def read_metrics(run) -> list:
    """The records of a metrics.jsonl (`run`: a run folder or the file); [] when there is none yet. A last line cut
    by a crash is left out with a warning; a damaged line before it is a UserError naming the line."""
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
