"""The run folder: config.json, metrics.jsonl (one JSON object per evaluation), summary.json, plots/,
checkpoints/, tensorboard/, and the `.cifarjax-run` marker that says cifarjax made the folder.

A user's files are never touched: `check_out` decides, before anything is written, whether --out may be
used (a new or empty folder, a run to resume, or with --overwrite a folder cifarjax marked as a run), and
`create` makes or replaces the folder only after the new run has started successfully, removing only
what cifarjax itself writes there.
"""
from __future__ import annotations

import json
import shutil
import time
import uuid
from pathlib import Path
from typing import Iterable, Optional

import cifarjax
from cifarjax.errors import UserError, user_error_from_os, warn
from cifarjax.files import atomic_write, write_json

CONFIG, METRICS, SUMMARY, PLOTS, MARKER = "config.json", "metrics.jsonl", "summary.json", "plots", ".cifarjax-run"
TENSORBOARD = "tensorboard"
# What cifarjax writes into a run folder; only these (and marked sub-runs) are removed by --overwrite.
OWN_ENTRIES = (CONFIG, METRICS, SUMMARY, PLOTS, "checkpoints", "frozen_params.npz", TENSORBOARD, "study.json",
               "study.md", MARKER)


def default_run_dir(experiment: str) -> Path:
    return Path("runs") / f"{experiment}-{time.strftime('%Y%m%d-%H%M%S')}"


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
            raise UserError(f"--resume needs an existing run folder, and {run} is empty or missing")
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
    return run


def create(run: Path, experiment: str, replace: bool = False) -> Path:
    """Make the run folder and its marker; with `replace`, first remove an old run's own files (never others)."""
    try:
        if replace and is_run(run):
            remove_run_files(run)
        (run / PLOTS).mkdir(parents=True, exist_ok=True)
        if not is_run(run):
            write_json(run / MARKER, {"experiment": experiment, "id": uuid.uuid4().hex, "cifarjax": cifarjax.__version__,
                                      "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
    except OSError as error:
        raise user_error_from_os(error, f"cannot create the run folder {run}") from None
    return run


def remove_run_files(run: Path) -> None:
    """Remove what cifarjax wrote in a marked run folder, marked sub-runs included; other files stay."""
    for entry in run.iterdir():
        if entry.name in OWN_ENTRIES or (entry.is_dir() and is_run(entry)):
            shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
    kept = sorted(e.name for e in run.iterdir())
    if kept:
        warn(f"--overwrite kept {', '.join(kept)} in {run}: cifarjax did not create them")


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


def read_metrics(run: Path) -> list:
    path = Path(run) / METRICS
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
