"""The run folder (its marker, lock, manifest of what cifarjax wrote, config.json and metrics) and its binding to
data, weights and commands (--overwrite removes only what the manifest lists); safe file writes; the cache folder."""
from __future__ import annotations

import atexit
import contextlib
import functools
import json
import os
import re
import shutil
import socket
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import cifarjax
from cifarjax.config import KINDS, Config
from cifarjax.errors import UserError, at_command_end, user_error_from_os, warn

CONFIG, METRICS, SUMMARY, PLOTS = "config.json", "metrics.jsonl", "summary.json", "plots"
TENSORBOARD, MARKER, MANIFEST, LOCK = "tensorboard", ".cifarjax-run", ".cifarjax-files", ".cifarjax-lock"
CHECKPOINTS, FROZEN = "checkpoints", "frozen_params.npz"
# Runs made before the manifest (2026-12-04): the names cifarjax gave its files there.
OWN_FILES = (CONFIG, METRICS, SUMMARY, FROZEN, "study.json", "study.md")
OWN_IN_FOLDERS = {PLOTS: "*.png", TENSORBOARD: "events.out.tfevents.*", CHECKPOINTS: "[0-9]*"}
MODEL_NAMES = {"simple_cnn": "SimpleCNN", "resnet18": "ResNet-18"}
COMMAND_MODELS = {"cnn": "simple_cnn", "finetune": "resnet18"}
NOT_OURS = "holds files that cifarjax did not create (it has no {} marker), so it will not write there".format(MARKER)
_recorded: set = set()  # (run folder, entry) pairs this process listed, so a write need not read the manifest
_UMASK = os.umask(0)
os.umask(_UMASK)


@dataclass
class RunFolder:
    """A run folder: checked before anything is written, then made with its marker and lock; manifest and metrics."""
    path: Path
    experiment: str = "python"
    resume: bool = False
    overwrite: bool = False

    @classmethod
    def check(cls, out, experiment: str, overwrite: bool = False, resume: bool = False) -> RunFolder:
        """The run folder for --out, checked before anything is written; raises UserError when it may not be used."""
        if overwrite and resume:
            raise UserError("--overwrite and --resume contradict each other; pass one of them")
        if resume and out is None:
            raise UserError("--resume needs --out RUN: the folder of the run to continue")
        run = Path(out).expanduser() if out is not None else \
            Path("runs") / f"{experiment}-{time.strftime('%Y%m%d-%H%M%S')}"
        blocker = next((p for p in [run, *run.parents] if p.exists() and not p.is_dir()), None)
        if blocker is not None:
            raise UserError(f"--out {run} is a file; choose a folder path" if blocker == run else
                            f"--out {run} lies below the file {blocker}; choose a folder path")
        used = _holds_files(run, "--out")
        if resume and not used:
            raise UserError(f"--resume needs an existing run folder, and {run} is empty or missing; check the "
                            "path, or leave out --resume to start a new run there")
        if used and not is_run(run):
            raise UserError(f"{run} is not a cifarjax run folder (it has no {MARKER} marker); pass the --out folder "
                            "of a run to resume" if resume else f"{run} {NOT_OURS} or replace it; choose another --out")
        if used and not resume and not overwrite:
            raise UserError(f"run folder {run} already holds a run; pass --resume to continue it, --overwrite to "
                            "replace it, or choose another --out")
        if used:
            _check_unlocked(run)
            _check_no_links(run)
        return cls(run, experiment, resume, overwrite)

    @classmethod
    def claim(cls, run) -> RunFolder:
        """Accept a run folder research code passed (`fit(run=...)`) when it is cifarjax's, new or empty."""
        run = Path(run)
        if is_run(run):
            _check_no_links(run)
        elif _holds_files(run, "the run folder"):
            raise UserError(f"{run} {NOT_OURS}; pass a new or empty run folder")
        return cls(run)

    @classmethod
    def holding(cls, path) -> Optional[RunFolder]:
        """The nearest folder at or above `path`'s parent that cifarjax marked as a run, or None."""
        return next((cls(parent) for parent in Path(path).absolute().parents if is_run(parent)), None)

    @functools.cached_property
    def saved(self) -> Optional[dict]:
        """The resumed run's config.json (None for a new run)."""
        return read_config(self.path) if self.resume else None

    @property
    def marker(self) -> dict:
        try:
            return json.loads((self.path / MARKER).read_text())
        except (OSError, ValueError):
            return {}

    def check_outside(self, data_dir) -> None:
        """Refuse a run folder inside the data folder the run reads: its folders would be read as data."""
        if not data_dir or not str(data_dir).strip():
            return
        data = os.path.realpath(Path(data_dir).expanduser())  # not Path.resolve: a symbolic link loop is refused later
        if Path(os.path.realpath(self.path.expanduser())).is_relative_to(data):
            raise UserError(f"--out {self.path} lies inside the data folder {data_dir}, where its files would become "
                            "part of the data; choose an --out outside it")

    def check_command(self, command: str) -> None:
        """Refuse to resume a run with a command that trains another model (cnn of a fine-tune, or the reverse)."""
        model, wanted, experiment = self.saved.get("model"), COMMAND_MODELS.get(command), self.marker.get("experiment")
        made_by = experiment if experiment in COMMAND_MODELS else \
            next((c for c, m in COMMAND_MODELS.items() if m == model), None)
        if wanted is None or (model == wanted and made_by in (None, command)):
            return
        maker = f"experiments.{made_by or experiment}"
        raise UserError(f"the run in {self.path} is a {MODEL_NAMES.get(model, model)} run made by {maker}, and "
                        f"experiments.{command} trains a {MODEL_NAMES[wanted]}: resume it with python -m {maker} "
                        f"--resume --out {self.path}")

    def bind(self, data_fingerprint: dict, data_dir, command_line: str) -> dict:
        """config.json's binding: the data's fingerprint (a resumed run's: other data is refused), the commands."""
        saved = self.saved or {}
        check_data(saved, data_fingerprint, data_dir, self.path)
        return {"data_fingerprint": saved.get("data_fingerprint") or data_fingerprint,
                "commands": [*saved.get("commands", []), command_line]}

    def create(self, replace: bool = False, take_lock: bool = False) -> RunFolder:
        """Make the folder and its marker: locked first with `take_lock`, an old run's files removed with `replace`."""
        mark = {"experiment": self.experiment, "id": uuid.uuid4().hex, "cifarjax": cifarjax.__version__,
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}  # before anything is made
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            if take_lock:
                self.lock()
            if replace and is_run(self.path):
                self.remove_own_files()
            if not is_run(self.path):
                write_json(self.path / MARKER, mark)
            (self.path / PLOTS).mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise user_error_from_os(error, f"cannot create the run folder {self.path}") from None
        return self

    def lock(self) -> None:
        """Mark the folder as used by this process until it exits (a stale lock is replaced, a live one refused)."""
        _check_unlocked(self.path)
        path, pid = (self.path / LOCK).absolute(), os.getpid()
        try:  # not through atomic_write: the lock is no output, so the manifest does not list it
            path.write_text(json.dumps({"host": socket.gethostname(), "pid": pid,
                                        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}))
        except OSError as error:
            raise user_error_from_os(error, f"cannot lock the run folder {self.path}") from None

        def release() -> None:  # only this process's own lock (not in a forked child)
            with contextlib.suppress(OSError, ValueError, AttributeError):
                if json.loads(path.read_text()).get("pid") == pid == os.getpid():
                    path.unlink()
        atexit.register(release)
        at_command_end.append(release)

    def manifest(self) -> list:
        """The paths (relative to the folder) its manifest lists; a line cut by a crash is ignored."""
        try:
            return [line for line in (self.path / MANIFEST).read_text().split("\n")[:-1] if line]
        except FileNotFoundError:
            return []

    @classmethod
    def record(cls, path) -> None:
        """List `path`, which cifarjax wrote, in the manifest of the run folder holding it (--overwrite removes it)."""
        folder = cls.holding(path)
        if folder is None or Path(path).name in (MARKER, MANIFEST):
            return
        entry = Path(path).absolute().relative_to(folder.path).as_posix()
        if (folder.path, entry) not in _recorded and entry not in folder.manifest():
            with open(folder.path / MANIFEST, "a") as f:
                f.write(entry + "\n")
        _recorded.add((folder.path, entry))

    @classmethod
    def free_name(cls, path) -> Path:
        """`path`, or where a user's file (one the manifest does not list) takes that name in a run folder, the
        first free or cifarjax's own name beside it: NAME-2.png, NAME-3.png ... (a run without a manifest: `path`)."""
        path = Path(path)
        folder = cls.holding(path)
        listed = set(folder.manifest()) if folder is not None else set()
        candidate, n = path, 1
        while listed and candidate.exists() and candidate.absolute().relative_to(folder.path).as_posix() not in listed:
            n += 1
            candidate = path.with_name(f"{path.stem}-{n}{path.suffix}")
        return candidate

    def remove_own_files(self) -> None:
        """Remove exactly what cifarjax wrote in the marked folder (its manifest's paths inside it, else the names
        it gives its files, and orbax's unfinished checkpoints), then the folders left empty; name what stays."""
        run, listed = self.path, self.manifest()
        entries = [run / e for e in listed if not Path(e).is_absolute() and ".." not in Path(e).parts
                   and Path(e).name not in (MANIFEST, MARKER)
                   and (run / e).parent.resolve().is_relative_to(run.resolve())]  # not through a link out of the run
        if not listed:
            entries = [run / name for name in OWN_FILES]
            entries += [p for folder, pattern in OWN_IN_FOLDERS.items() for p in (run / folder).glob(pattern)]
        for entry in entries + list((run / CHECKPOINTS).glob("*.orbax-checkpoint-tmp*")):
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            elif entry.exists() or entry.is_symlink():
                entry.unlink()
        subruns = [e for e in run.iterdir() if e.is_dir() and not e.is_symlink() and is_run(e)]
        for sub in subruns:
            RunFolder(sub).remove_own_files()
        folders = {run / name for name in OWN_IN_FOLDERS} | {
            run / parent for e in listed for parent in Path(e).parents if parent != Path(".")}
        for folder in [*subruns, *sorted(folders, key=lambda p: -len(p.parts))]:
            if folder.is_dir() and not folder.is_symlink():
                with contextlib.suppress(OSError):  # only an empty one goes
                    folder.rmdir()
        for name in (MANIFEST, MARKER):
            (run / name).unlink(missing_ok=True)
        kept = sorted(p.relative_to(run).as_posix() for p in run.rglob("*") if p.name != LOCK and not p.is_dir())
        if kept:
            more = f" and {len(kept) - 5} more" if len(kept) > 5 else ""
            warn(f"--overwrite kept {', '.join(kept[:5])}{more} in {run}: cifarjax did not create them")

    def write_metrics(self, records: list) -> None:
        """Rewrite metrics.jsonl with `records` (at start and on resume, to match the checkpoint)."""
        write_text(self.path / METRICS, "".join(json.dumps(r) + "\n" for r in records))

    def append_metrics(self, record: dict) -> None:
        with open(self.path / METRICS, "a") as f:
            f.write(json.dumps(record) + "\n")


def run_name(run: Path) -> str:
    """How figures name a run: its folder's name, with its parent's for one length of a fine-tune (`X/epochs-20`)."""
    run = Path(run).resolve()
    return f"{run.parent.name}/{run.name}" if re.fullmatch(r"epochs-\d+", run.name) else run.name


def is_run(folder: Path) -> bool:
    """Whether cifarjax marked `folder` as one of its run folders."""
    return (Path(folder) / MARKER).is_file()


def _holds_files(folder: Path, doing: str) -> bool:
    """Whether `folder` exists and holds anything (a file counts)."""
    try:
        return folder.exists() and (not folder.is_dir() or any(folder.iterdir()))
    except OSError as error:
        raise user_error_from_os(error, f"cannot read {doing} {folder}") from None


def _check_no_links(run: Path) -> None:
    """Refuse a run folder whose plots/, tensorboard/ or checkpoints/ is a symbolic link out of it."""
    for name in OWN_IN_FOLDERS:
        if (run / name).is_symlink():
            raise UserError(f"{run / name} is a symbolic link (to {os.readlink(run / name)}); cifarjax writes its "
                            f"{name} there and will not write through a link into a folder it did not create: "
                            "replace the link with a folder, or choose another --out")


def _check_unlocked(run: Path) -> None:
    """Refuse a run folder that a live process is using (its lock names the host and process)."""
    try:
        holder = json.loads((run / LOCK).read_text())
        host, pid = str(holder["host"]), int(holder["pid"])
    except (OSError, ValueError, KeyError, TypeError):
        return  # none, or one cut by a crash while it was written: its process never started the run
    if host != socket.gethostname():
        raise UserError(f"run folder {run} is in use by process {pid} on host {host} (its lock {run / LOCK}); "
                        "wait for it, or if that process is gone delete that file and try again")
    if pid == os.getpid():
        return
    try:
        with contextlib.suppress(PermissionError):  # alive, another user's
            os.kill(pid, 0)
    except ProcessLookupError:
        return  # a stale lock
    raise UserError(f"run folder {run} is in use by process {pid} on this machine; wait for it to finish or stop "
                    f"it (kill {pid}: it saves a checkpoint), then try again")


@contextlib.contextmanager
def atomic_write(path, mode: str = "w") -> Iterator:
    """Open a unique temporary file beside `path`; on success it replaces `path` (and is listed in the manifest of
    the run folder holding it), on failure it is removed (a full disk never stays full of leftovers)."""
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
    RunFolder.record(path)


def write_text(path, text: str) -> None:
    with atomic_write(path) as f:
        f.write(text)


def write_json(path, value) -> None:
    write_text(path, json.dumps(value, indent=2) + "\n")


def cache_dir() -> Path:
    """The cache folder (decoded datasets, converted weights): $CIFARJAX_CACHE, default ~/.cache/cifarjax."""
    return Path(os.environ.get("CIFARJAX_CACHE", Path.home() / ".cache" / "cifarjax")).expanduser()


# config.json's keys beside the Config fields (its binding, experiments.finetune), each with what it must be.
RECORDED = {"data_fingerprint": ("an object with sha256 and images", lambda v: isinstance(v, dict) and
                                 isinstance(v.get("sha256"), str) and isinstance(v.get("images"), dict)),
            "commands": ("a list of strings", lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v)),
            "epoch_counts": ("a list of integers", lambda v: isinstance(v, list) and v and
                             all(isinstance(x, int) and not isinstance(x, bool) for x in v)),
            "frozen_params": ("an object with path and sha256", lambda v: isinstance(v, dict) and
                              isinstance(v.get("path"), str) and isinstance(v.get("sha256"), str)),
            **dict.fromkeys(("weights_label", "weights_file", "weights_sha256"), KINDS["str"])}


def absolute(path) -> str:
    """`path` as an absolute path, so that a run means the same folder from any folder."""
    try:
        return str(Path(path).expanduser().resolve())
    except (OSError, RuntimeError):  # a symbolic link loop: the loader names it
        return os.path.abspath(os.path.expanduser(path))


def absolute_paths(values: dict) -> dict:
    """Config values with data_dir and a weights file made absolute ('imagenet' and 'random' stay names)."""
    kept = {"data_dir": (None,), "weights": (None, "imagenet", "random")}  # values that name no file
    return {k: absolute(v) if k in kept and v not in kept[k] and str(v).strip() else v for k, v in values.items()}


def check_data(saved: dict, now: dict, data_dir, run,
               fix: str = "pass the run's own data with --data-dir, or start a new run") -> None:
    """Refuse data whose fingerprint differs from the run's (another folder with the same images is fine)."""
    then = saved.get("data_fingerprint")
    if not then or then["sha256"] == now["sha256"]:
        return
    n_now, n_then = sum(now["images"].values()), sum(then["images"].values())
    change = (f"{n_now} images now, {n_then} when the run started" if n_now != n_then else
              f"{n_now} images as when the run started, but not the same ones")
    raise UserError(f"the data in {data_dir} differs from the run's in {run} ({change}; fingerprint "
                    f"{now['sha256'][:12]} now, {then['sha256'][:12]} then): {fix}")


def check_weights(recorded: Optional[str], now: Optional[str], path, run, needed_for: str) -> None:
    """Refuse a weights file whose SHA-256 is not the one the run started from, where the run still needs it."""
    if recorded is None or recorded == now:
        return
    state = "is missing" if now is None else \
        f"changed since the run started (sha256 {now[:12]} now, {recorded[:12]} then)"
    raise UserError(f"the weights file {path} {state}, and {needed_for} needs the run's starting weights: restore "
                    "the original file, or start a new run")


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


def read_metrics(run) -> list:
    """The records of a metrics.jsonl (`run`: a run folder or the file); [] when there is none yet. A last line cut
    by a crash is left out with a warning; a damaged line before it is a UserError naming the line."""
    path = Path(run) / METRICS if Path(run).is_dir() else Path(run)
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
