"""`--seeds 0 1 2`: one experiment run once per seed into one folder (`OUT/seed-N`, each a whole run), and its
accuracies as mean ± sd over the seeds: OUT/summary.json, the closing line and OUT/plots/seeds.png (mean with a
band of one sd). `--seed` changes the train/validation split too, so the spread is over both."""
from __future__ import annotations

import copy
import json
import shlex
from pathlib import Path
from typing import Callable

from cifarjax import distributed, plots, runs
from cifarjax.errors import UserError
from cifarjax.runs import write_json
from cifarjax.loop import History
from cifarjax.records import mean_sd, per_epoch

SEEDS = "seeds.json"  # OUT's record of its seeds, so that --resume --out OUT continues them all
READINGS = {"val_accuracy": "validation accuracy", "best_val_accuracy": "best", "last5_mean_val_accuracy":
            "last-{} mean", "test_accuracy": "test accuracy"}


def add_flag(parser) -> None:
    parser.add_argument("--seeds", type=int, nargs="+", default=None, metavar="SEED",
                        help="run once per seed into --out/seed-N and report mean ± sd over the seeds (instead of "
                             "--seed; each seed also draws its own train/validation split)")


def is_seeds_folder(folder) -> bool:
    return (Path(folder) / SEEDS).is_file()


def planned(args) -> list:
    """The seeds to run: --seeds, or on --resume of a seeds folder its own; [] for a single run."""
    if args.seeds is not None:
        if hasattr(args, "seed"):
            raise UserError("--seed and --seeds contradict each other; pass one of them")
        if len(set(args.seeds)) != len(args.seeds) or min(args.seeds) < 0 or max(args.seeds) >= 2**32:
            raise UserError(f"--seeds takes distinct seeds in [0, 2^32), got {' '.join(map(str, args.seeds))}")
        return list(args.seeds)
    if args.resume and args.out is not None and is_seeds_folder(args.out):
        return planned_in(args.out)
    return []


def planned_in(folder) -> list:
    """The seeds a --seeds folder was run with."""
    return json.loads((Path(folder) / SEEDS).read_text())["seeds"]


def one_seed_command(command_line: str, seed: int, out: Path) -> str:
    """The command line of one seed's run: without --seeds, --seed and --out, then with its own."""
    words, kept = shlex.split(command_line), []
    while words:
        word = words.pop(0)
        name, inline = word.split("=")[0], "=" in word
        if name not in ("--seeds", "--seed", "--out"):
            kept.append(word)
            continue
        values = 0 if inline else 1 if name != "--seeds" else len(words)
        while values and words and not words[0].startswith("-"):
            words.pop(0)
            values -= 1
    return " ".join(map(shlex.quote, [*kept, "--seed", str(seed), "--out", str(out)]))


def run(command: str, args, run_one: Callable) -> None:
    """`run_one(args)`: once, or once per seed where --seeds asks (or --resume continues a --seeds folder)."""
    seeds = planned(args)
    if seeds:
        run_each(command, args, run_one, seeds)
    else:
        run_one(args)


def run_each(command: str, args, run_one: Callable, seeds: list) -> None:
    """Run `run_one(args)` once per seed into OUT/seed-N (resumed where it exists and --resume was given), then
    write OUT's summary.json and seeds.png and print the mean ± sd."""
    root = runs.RunFolder.check(args.out, command, args.overwrite, args.resume)
    out = root.path
    earlier = json.loads((out / SEEDS).read_text())["commands"] if args.resume and is_seeds_folder(out) else []
    commands = [*earlier, args.command_line]
    if distributed.is_writer():
        root.create(replace=args.overwrite)
        write_json(out / SEEDS, {"seeds": seeds, "commands": commands})
    for seed in seeds:
        folder = out / f"seed-{seed}"
        one = copy.copy(args)
        one.seed, one.seeds, one.out = seed, None, str(folder)
        one.resume = args.resume and runs.is_run(folder)
        one.command_line = one_seed_command(args.command_line, seed, folder)
        print(f"seed {seed} ({seeds.index(seed) + 1} of {len(seeds)}): {folder}")
        run_one(one)
    if distributed.is_writer():
        summary = summarise(out, seeds, commands)
        write_json(out / runs.SUMMARY, summary)
        plots.plot_runs(curves(out, seeds), out / runs.PLOTS / "seeds.png",
                        title=f"Mean ± sd over seeds {', '.join(map(str, seeds))}: {out.name}")
        print(f"{len(seeds)} seeds: {closing_line(summary)}; run folder: {out}")


def leaf_runs(folder: Path) -> dict:
    """{'N epochs': run folder} of one seed's run: the run itself, or each of a fine-tune's lengths."""
    if (folder / runs.METRICS).is_file():
        return {f"{runs.read_config(folder)['n_epochs']} epochs": folder}
    lengths = sorted((p for p in folder.glob("epochs-*") if (p / runs.METRICS).is_file()),
                     key=lambda p: int(p.name.split("-")[1]))
    return {f"{p.name.split('-')[1]} epochs": p for p in lengths}


def summarise(out: Path, seeds: list, commands: list) -> dict:
    """Each seed's readings and their mean ± sd (sample sd), per fine-tune length where there are several."""
    per_seed, groups = [], {}
    for seed in seeds:
        for label, folder in leaf_runs(out / f"seed-{seed}").items():
            summary = runs.read_json(folder / runs.SUMMARY)
            readings = {k: summary[k] for k in READINGS if isinstance(summary.get(k), (int, float))}
            per_seed.append({"seed": seed, "epochs": int(label.split()[0]), **readings})
            last = summary.get("last_mean_epochs", 5)
            for k, v in readings.items():
                groups.setdefault(label, {}).setdefault(k, []).append(v)
    stats = {label: {k: mean_sd(v) for k, v in readings.items()} for label, readings in groups.items()}
    return {"experiment": runs.RunFolder(out).marker.get("experiment"), "seeds": seeds, "commands": commands,
            "per_seed": per_seed, "mean_sd": stats, "last_mean_epochs": last}


def closing_line(summary: dict) -> str:
    parts = []
    for label, stats in summary["mean_sd"].items():
        figures = ", ".join(f"{READINGS[k].format(summary['last_mean_epochs'])} {100 * s['mean']:.2f} ± "
                            f"{100 * s['sd']:.2f}%" for k, s in stats.items())
        parts.append(f"{label}: {figures}")
    return "; ".join(parts) + " (mean ± sd over the seeds)"


def curves(out: Path, seeds: list) -> dict:
    """plot_runs' curves: per length, the mean validation and training accuracy per epoch and their sd."""
    found = {}
    for seed in seeds:
        for label, folder in leaf_runs(out / f"seed-{seed}").items():
            found.setdefault(label, []).append(History(runs.read_metrics(folder)))
    return {f"{label}, mean of {len(histories)} seeds": mean_curves(histories) for label, histories in found.items()}


CURVES = {"val": lambda h: h.epoch_val_accuracy, "train": lambda h: h.train_accuracy}


def mean_curves(histories: list, curves: dict = CURVES) -> dict:
    """plot_runs' curve of runs (or one run): per curve of `curves` ({key: of a History}) that every run has in full,
    the mean per epoch and its sd."""
    curve = {}
    for key, of in curves.items():
        series = [of(h) for h in histories]
        if all(series) and all(v is not None for values in series for v in values):
            curve[key], curve[f"{key}_sd"] = per_epoch(series)
    return curve
