"""The run folder: config.json, metrics.jsonl (one JSON object per evaluation), summary.json, plots/,
checkpoints/. An existing run is never overwritten unless asked."""
from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Iterable

from cifarjax.errors import UserError

CONFIG, METRICS, SUMMARY, PLOTS = "config.json", "metrics.jsonl", "summary.json", "plots"


def default_run_dir(experiment: str) -> Path:
    return Path("runs") / f"{experiment}-{time.strftime('%Y%m%d-%H%M%S')}"


def prepare_run_dir(out, experiment: str, overwrite: bool = False, resume: bool = False) -> Path:
    """Create the run folder. An existing non-empty one is kept for --resume, replaced with --overwrite,
    and otherwise refused."""
    if overwrite and resume:
        raise UserError("--overwrite and --resume contradict each other; pass one of them")
    run = Path(out) if out is not None else default_run_dir(experiment)
    if run.exists() and not run.is_dir():
        raise UserError(f"--out {run} is a file; choose a folder path")
    if run.is_dir() and any(run.iterdir()):
        if resume:
            return run
        if not overwrite:
            raise UserError(f"run folder {run} already holds a run; pass --resume to continue it, --overwrite to "
                            "replace it, or choose another --out")
        shutil.rmtree(run)
    elif resume:
        raise UserError(f"--resume needs an existing run folder, and {run} is empty or missing")
    (run / PLOTS).mkdir(parents=True, exist_ok=True)
    return run


RESUMABLE_CHANGES = ("n_epochs", "norm_mean", "norm_std", "classes", "num_classes", "weights", "epochs")


def check_resume_config(run: Path, config: dict) -> None:
    """A resumed run must use the settings it started with (only the epoch count may grow)."""
    saved = read_json(run / CONFIG)
    changed = sorted(k for k in config if k in saved and k not in RESUMABLE_CHANGES and saved[k] != config[k])
    if changed:
        details = ", ".join(f"{k}: {saved[k]!r} → {config[k]!r}" for k in changed)
        raise UserError(f"--resume with settings that differ from the run in {run} ({details}); "
                        "pass the original flags, or start a new run with another --out")


def write_json(path: Path, value) -> None:
    """Write JSON atomically (a temporary file renamed into place)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(value, indent=2) + "\n")
    os.replace(tmp, path)


def read_json(path: Path):
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise UserError(f"{path} is missing; is {Path(path).parent} a cifarjax run folder?") from None


def write_metrics(run: Path, records: Iterable[dict]) -> None:
    """Rewrite metrics.jsonl with `records` (used at start and on resume, to match the checkpoint)."""
    tmp = run / f".{METRICS}.tmp"
    tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
    os.replace(tmp, run / METRICS)


def append_metrics(run: Path, record: dict) -> None:
    with open(run / METRICS, "a") as f:
        f.write(json.dumps(record) + "\n")
