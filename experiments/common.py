"""What the experiment commands share: the command line, a run's start (distributed runtime, run folder,
configuration, data), and its outputs (scoring, plots, summary.json)."""
from __future__ import annotations

import functools
import importlib.metadata
import math
import os
import platform
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import jax  # noqa: E402

import cifarjax  # noqa: E402
from experiments import seeds  # noqa: E402
from cifarjax import distributed, plots, runs  # noqa: E402
from cifarjax.augment import with_normalization  # noqa: E402
from cifarjax.checkpoint import latest_epoch, quiet_orbax  # noqa: E402
from cifarjax.config import Config  # noqa: E402
from cifarjax.cpu import process as cpu_process  # noqa: E402
from cifarjax.data import Dataset, Split, fingerprint, load_dataset, train_indices, train_val_split  # noqa: E402
from cifarjax.errors import UserError, set_interrupt_advice  # noqa: E402
from cifarjax.predictor import predict, score  # noqa: E402
from cifarjax.runs import cache_dir  # noqa: E402
from cifarjax.flags import Parser, add_config_flags, given, new_config, resumed_config  # noqa: E402
from cifarjax.phases import Phases, peak_memory_mb  # noqa: E402
from cifarjax.target import deterministic, resolve, runs_on_cpu  # noqa: E402
from cifarjax.recipes import recipe_config  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def enable_compilation_cache() -> None:
    """Keep compiled programs in the cache folder, so a second run of a command skips most compilation
    (JAX's persistent cache; CIFARJAX_COMPILATION_CACHE=0 turns it off, JAX_COMPILATION_CACHE_DIR moves it)."""
    if os.environ.get("CIFARJAX_COMPILATION_CACHE", "1") == "0" or os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        return
    jax.config.update("jax_compilation_cache_dir", str(cache_dir() / "jax-compilation"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


def launch(main: Callable[[], None], package: str = "experiments") -> None:
    """Run a command's `main` after the process-wide settings that importing a command never makes: no update check,
    the CPU's tuning before JAX starts (it may relaunch the process), the compilation cache, orbax kept quiet."""
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    cpu_process.tune(package)
    enable_compilation_cache()
    quiet_orbax()
    git_commit()  # the code that runs, read before it does
    main()


PACKAGES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy", "torch", "torchvision", "albumentations")


def parse(command: str, description: str, argv=None, nargs: Optional[dict] = None, shown: Optional[dict] = None):
    """The command's flags, parsed; `args.command_line` records how it was called (for summary.json)."""
    args = make_parser(command, description, nargs, shown).parse_args(argv)
    argv = sys.argv[1:] if argv is None else argv
    args.command_line = " ".join([f"python -m experiments.{command}", *map(shlex.quote, map(str, argv))])
    return args


def make_parser(command: str, description: str, nargs: Optional[dict] = None, shown: Optional[dict] = None) -> Parser:
    """Flags for the command's Config fields (from their metadata), the run folder and the distributed runtime
    (`shown`: defaults --help shows where the command's differ from its recipe's, as add_config_flags')."""
    p = Parser(prog=f"python -m experiments.{command}", description=description)
    add_config_flags(p, command, recipe_config(command if command in ("cnn", "finetune") else "finetune"),
                     nargs=nargs, shown=shown)
    r = p.add_argument_group("run folder")
    r.add_argument("--out", default=None, help="run folder (default: runs/<experiment>-<timestamp>)")
    r.add_argument("--overwrite", action="store_true",
                   help="replace the run in --out (only a folder cifarjax marked as a run; other files stay)")
    r.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its newest intact checkpoint, with its own settings")
    if command in ("cnn", "finetune"):
        seeds.add_flag(r)
    d = p.add_argument_group("several processes or hosts (jax.distributed)")
    d.add_argument("--distributed", action="store_true",
                   help="detect the cluster (SLURM, Open MPI, Kubernetes, TPU, JAX_COORDINATOR_ADDRESS ...)")
    d.add_argument("--coordinator", default=None, metavar="HOST:PORT", help="process 0's address")
    d.add_argument("--num-processes", type=int, default=None, metavar="N", help="how many processes in all")
    d.add_argument("--process-id", type=int, default=None, metavar="I", help="this process's index, 0..N-1")
    return p


@dataclass
class Start:
    """A command's starting point: its run folder, resolved configuration, data and phase clock."""
    folder: runs.RunFolder
    config: Config
    dataset: Dataset
    train: Split
    val: Split
    phases: Phases
    command_line: str
    binding: dict = field(default_factory=dict)  # what config.json records the run is bound to (`RunFolder.bind`)
    commands: Optional[list] = None  # every command that built the run, this one last (set by `open_run`)

    @property
    def run(self) -> Path:
        return self.folder.path

    @property
    def resume(self) -> bool:
        return self.folder.resume

    @property
    def saved(self) -> Optional[dict]:
        """The resumed run's config.json."""
        return self.folder.saved


def start(command: str, args, typed: Optional[dict] = None, **fixed) -> Start:
    """Initialise the distributed runtime, check --out, resolve the configuration (new, or the resumed run's with the
    flags that may change) and load the data; nothing is written until `open_run`."""
    git_commit()  # the code that runs, read before it trains
    distributed.initialize(args.coordinator, args.num_processes, args.process_id, auto=args.distributed)
    folder = runs.RunFolder.check(args.out, command, args.overwrite, args.resume)
    run = folder.path
    typed = runs.absolute_paths(given(args, command) if typed is None else typed)
    if args.resume:
        folder.check_command(command)
        config = resumed_config(Config.from_dict(folder.saved, str(run / runs.CONFIG)), typed, args.recipe, str(run))
    else:
        config = new_config(command, args.recipe, typed, **fixed)
    folder.check_outside(config.data_dir)
    if runs_on_cpu():
        cpu_process.schedule_for(config)  # before anything starts JAX's backend (orbax, `is_writer`)
    elif config.deterministic:
        deterministic()
    done = latest_epoch(run) if args.resume else None
    if done is not None and done > config.n_epochs:
        raise UserError(f"the run in {run} already trained {done:g} epochs; pass --epochs {math.ceil(done)} or more "
                        "to resume it")
    phases = Phases(announce=distributed.is_writer())
    with phases("data_loading", "loading the data"):
        dataset = load_dataset(config.data_dir, config.dataset, config.decode_size, config.classes)
        train, val = train_val_split(dataset, config.val_fraction, config.seed, config.subset)
    if args.resume and config.classes and tuple(dataset.classes) != tuple(config.classes):
        raise UserError(f"the data in {config.data_dir} has classes {list(dataset.classes)}, the run in {run} was "
                        f"trained on {list(config.classes)}; pass the run's own data folder")
    data = fingerprint(dataset)
    bound = folder.bind(data, config.data_dir, args.command_line)
    config = with_normalization(config.replace(classes=tuple(dataset.classes), num_classes=len(dataset.classes))
                                .validate(), train.images)
    train_indices(len(train), config.batch_size, jax.device_count(), config.seed, 0)  # the batch fits data and devices
    distributed.agree({"config": {**config.to_dict(), "data_dir": None}, "data": data_fingerprint(train, val),
                       "run": str(run.resolve())}, "their settings")
    return Start(folder, config, dataset, train, val, phases, args.command_line, binding=bound)


def data_fingerprint(train: Split, val: Split) -> dict:
    return {"train": [len(train), int(train.labels.sum()), int(train.images[:64].sum())],
            "val": [len(val), int(val.labels.sum()), int(val.images[:64].sum())]}


def open_run(s: Start, command: str, config_json: dict) -> None:
    """Create (or replace) the run folder, write config.json with every command that built the run, and check every
    process sees the same folder; from here a Ctrl-C says how to resume."""
    s.commands = s.binding["commands"]
    if distributed.is_writer():
        s.folder.create(replace=s.folder.overwrite, take_lock=True)
        runs.write_json(s.run / runs.CONFIG, {**config_json, **s.binding})
    set_interrupt_advice(f"the run folder {s.run} is kept: resume with {resume_hint(command, s.run)}")
    distributed.barrier("run folder created")
    distributed.agree({"run_id": s.folder.marker.get("id")}, f"the run folder {s.run} (it must be the same "
                      "folder on shared storage for every process)")


def resume_hint(command: str, run: Path) -> str:
    run = run.parent if seeds.is_seeds_folder(run.parent) else run  # one seed's run: resume them all
    return f"python -m experiments.{command} --resume --out {shlex.quote(str(run))}"


def restart_hint(s: Start) -> str:
    """The command that started the run, made to start it again in its folder (--overwrite --out RUN; no --resume
    and no --lr, which the caller adds)."""
    words, kept = shlex.split((s.commands or [s.command_line])[0]), []
    while words:
        word = words.pop(0)
        if word in ("--out", "--lr"):
            words = words[1:]
        elif word.split("=")[0] not in ("--out", "--lr", "--resume", "--overwrite"):
            kept.append(word)
    return " ".join(map(shlex.quote, [*kept, "--overwrite", "--out", str(s.run)]))


def scored_split(s: Start):
    """(split, name) for the final score: the data's test split when it has one, else validation."""
    return (s.dataset.test, "test") if s.dataset.test is not None else (s.val, "val")


def report_split(config: Config, result, split: Split, name: str, run: Path, phases: Phases) -> dict:
    """Accuracy on `split`, with its confusion-matrix and sample-prediction plots in run/plots (the validation
    split reuses the training's final evaluation when there was one)."""
    preds = result.val_predictions if name == "val" else None
    if preds is None:
        with phases("evaluation", f"scoring the {name} split"):
            preds = predict(config, result.eval_variables, split)
    result = score(split.labels, preds, config.classes)
    if distributed.is_writer():
        with phases("plotting", "writing the confusion matrix and sample predictions"):
            plots.plot_split(run, name, split, preds, result["confusion_matrix"], config.classes)
    return {f"{name}_accuracy": result["accuracy"], "scored_split": name}


def training_rate(folder: Path, result) -> Optional[float]:
    """summary.json's images_per_second: this fit's training rate; where it trained nothing (a finished run
    resumed), the rate the run's earlier summary.json recorded, else None (not 0: nothing was measured)."""
    if result.this_process["images_trained"]:
        return round(result.images_per_second, 1)
    try:
        earlier = runs.read_json(folder / runs.SUMMARY).get("images_per_second")
    except (UserError, AttributeError):  # no earlier summary, or not one cifarjax wrote
        return None
    return earlier if isinstance(earlier, (int, float)) and not isinstance(earlier, bool) and earlier > 0 else None


def run_summary(experiment: str, s: Start, config: Config, result, folder: Optional[Path] = None, **extra) -> dict:
    """summary.json's common part: readings, per-epoch curves, timings, provenance and environment (`folder`:
    the run's, where it is not `s.run`)."""
    h = result.history
    return {"experiment": experiment, "recipe": config.recipe, "epochs": config.n_epochs, **h.readings(),
            "train_accuracy": h.train_accuracy[-1], "train_loss": h.train_loss[-1],
            "val_accuracy_per_epoch": h.epoch_val_accuracy, "train_accuracy_per_epoch": h.train_accuracy,
            "wall_seconds": round(result.seconds, 2), "images_per_second": training_rate(folder or s.run, result),
            "this_process": result.this_process, "sessions": len(s.commands or [s.command_line]),
            "evaluated_weights": "moving average" if result.average is not None else "final",
            **extra, **s.phases.summary(), **provenance(s.command_line, s.commands), **environment()}


def closing_figures(summary: dict) -> str:
    """The closing line's figures, which add up: the readings (a last-N mean over the epochs there were), what
    this process trained and how fast, and the training time over all sessions when the run was resumed."""
    n = summary.get("last_mean_epochs", 5)
    readings = (f"validation accuracy {summary['val_accuracy']:.4f} (best {summary['best_val_accuracy']:.4f}, "
                f"{'last-five' if n == 5 else f'last-{n}'} mean {summary['last5_mean_val_accuracy']:.4f})")
    mine = summary.get("this_process") or {}
    if not mine.get("images_trained"):
        trained = "this process trained nothing (the run had already finished)"
    elif mine["training_seconds"] > 0 and mine["images_trained"] > mine["compile_images"]:
        trained = (f"this process trained {mine['images_trained']:,} images: {mine['compile_seconds']:.0f} s "
                   f"compiling (and the first {mine['compile_images']:,}), then "
                   f"{mine['images_trained'] - mine['compile_images']:,} in {mine['training_seconds']:.0f} s "
                   f"({mine['images_per_second']:.0f} images/s)")
    else:
        trained = (f"this process trained {mine['images_trained']:,} images in one call of "
                   f"{mine['compile_seconds']:.0f} s, compilation included")
    if summary.get("sessions", 1) > 1:
        trained += (f"; {summary['wall_seconds']:.0f} s of training (compilation included) and evaluation over all "
                    f"{summary['sessions']} sessions")
    return f"{readings}; {trained}"


@functools.lru_cache(maxsize=None)
def git_commit() -> Optional[str]:
    """The checkout's commit (with '+dirty' when it has uncommitted changes), or None outside git; read once, when
    the command starts, so a commit made while it runs is not recorded as the code that ran."""
    try:
        head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=10)
        if head.returncode:
            return None
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return head.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def provenance(command_line: str, commands: Optional[list] = None) -> dict:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    started = Phases().started
    return {"started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
            "command": command_line, "commands": commands or [command_line],
            "git_commit": git_commit(), "cifarjax": cifarjax.__version__, "packages": versions}


def environment() -> dict:
    """Where a run ran (every device of every process), and its peak memory so far."""
    devices = jax.devices()
    return {"device_kind": devices[0].device_kind, "device_count": len(devices), "process_count": jax.process_count(),
            "platform": devices[0].platform, "jax": jax.__version__, "host": platform.node(),
            "cpu_count": os.cpu_count(), "program_platform": resolve(), "cpu_tuning": cpu_process.applied(),
            "peak_rss_mb": peak_memory_mb()}
