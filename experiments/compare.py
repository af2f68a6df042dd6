"""Compare runs: their validation curves in one plot, and a table of the settings that differ with each run's
final validation accuracy and loss, best accuracy and mean accuracy over the last five epochs.

    python -m experiments.compare RUN [RUN ...] [--out comparison.png]

The plot goes to the first run's plots/comparison.png unless --out names another file. An existing plot is
replaced only with --overwrite, and a file cifarjax did not write in a run folder never: the default plot then
goes beside it (comparison-2.png, said in one line), and --out naming one is refused.
"""
from __future__ import annotations

import re
import statistics
import textwrap
from pathlib import Path

from experiments import seeds
from cifarjax import plots, runs
from cifarjax.checkpoint import find_run
from cifarjax.errors import UserError, exit_on_user_error
from cifarjax.flags import Parser
from cifarjax.loop import History

IGNORED = ("classes", "norm_mean", "norm_std", "data_dir", "weights_label", "n_epochs", "epoch_counts", "weights_file",
           "weights_sha256", "data_fingerprint", "commands", "frozen_params")
WIDTH = 100  # the table's most columns; settings that do not fit are listed under it
DEFAULT_PLOT = Path(runs.PLOTS) / "comparison.png"


def load_run(folder) -> dict:
    """A run's name, config and history (from its config.json and metrics.jsonl)."""
    run = find_run(folder) if not (Path(folder) / runs.METRICS).is_file() else Path(folder)
    records = runs.read_metrics(run)
    if not any(r.get("epoch_end") for r in records):
        raise UserError(f"{run} has no finished epoch in {runs.METRICS} yet; pass a run that finished an epoch")
    return {"name": str(folder), "folder": run, "config": runs.read_config(run),
            "history": History(records)}


def seed_groups(folder) -> list:
    """A --seeds folder as one entry per length: its seeds' runs as `members`, compared as mean ± sd."""
    groups, each = {}, seeds.planned_in(folder)
    for seed in each:
        for label, run in seeds.leaf_runs(Path(folder) / f"seed-{seed}").items():
            groups.setdefault(label, []).append(load_run(run))
    return [{"name": f"{folder} ({label + ', ' if len(groups) > 1 else ''}{len(members)} seeds)",
             "folder": Path(folder), "members": members, "history": members[0]["history"],
             "config": {**members[0]["config"], "seed": " ".join(map(str, each))}}
            for label, members in groups.items()]


def expand(folder) -> list:
    """The runs a folder argument stands for: itself, or each of the several runs it holds (a fine-tune's
    `epochs-N` lengths, shortest first)."""
    path = Path(folder)
    if not path.is_dir() or (path / runs.METRICS).is_file():
        return [folder]
    held = [p for p in path.iterdir() if (p / runs.METRICS).is_file()]
    if len(held) < 2:
        return [folder]
    numbers_as_numbers = lambda p: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", p.name)]  # noqa: E731
    return [str(p) for p in sorted(held, key=numbers_as_numbers)]


def val_losses(history: History) -> list:
    """The validation loss at each epoch end (None in records written before it was recorded)."""
    return [r.get("val_loss") for r in history.records if r.get("epoch_end")]


def differing(configs: list) -> list:
    keys = sorted({k for c in configs for k in c} - set(IGNORED))
    return [k for k in keys if len({repr(c.get(k)) for c in configs}) > 1]


def short_names(names: list) -> list:
    """The run names without the folders they all share ('runs/a', 'runs/b' -> 'a', 'b'); the same run given
    twice is numbered."""
    parts = [Path(n).parts for n in names]
    common = 0
    while len(names) > 1 and all(len(p) > common + 1 and p[common] == parts[0][common] for p in parts):
        common += 1
    short = [str(Path(*p[common:])) for p in parts]
    return short if len(set(short)) == len(short) else [f"{n} ({i})" for i, n in enumerate(short, 1)]


def legend_labels(names: list, loaded: list, most: int = 3) -> list:
    """Each run's name with the settings that differ between the runs (the first `most`, then '...')."""
    keys = differing([r["config"] for r in loaded])
    def settings(config):
        shown = [f"{k}={_cell(config.get(k))}" for k in keys[:most]] + (["..."] if len(keys) > most else [])
        return f" [{', '.join(shown)}]" if shown else ""
    return [name + settings(r["config"]) for name, r in zip(names, loaded)]


def readings(history: History, n_last: int) -> tuple:
    """Final validation accuracy (%) and loss, best accuracy (%), the mean of the last `n_last` epochs' (%)."""
    acc, losses = history.epoch_val_accuracy, val_losses(history)
    return (100 * acc[-1], losses[-1] if losses else None, 100 * max(acc), 100 * sum(acc[-n_last:]) / n_last)


def _spread(values: tuple, digits: int) -> str:
    """One run's value, or several seeds' mean±sd (sample sd); '-' where a run has none."""
    if any(v is None for v in values):
        return "-"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.fmean(values):.{digits}f}±{statistics.stdev(values):.{digits}f}"


def _cell(value) -> str:
    return "-" if value is None else f"{value:g}" if isinstance(value, float) else str(value)


def table(loaded: list, width: int = WIDTH) -> str:
    """One row per run: the settings that differ, epochs trained, then final validation accuracy and loss, best
    accuracy and the mean of the last five epochs' (fewer when fewer ran). Settings columns that would make the
    table wider than `width` are listed under it instead."""
    histories = [m["history"] for r in loaded for m in r.get("members", [r])]
    n_last = min(5, *(len(h.epoch_val_accuracy) for h in histories))
    rows = []
    for r in loaded:
        members = [m["history"] for m in r.get("members", [r])]
        trained, planned = min(len(h.epoch_val_accuracy) for h in members), r["config"].get("n_epochs")
        figures = list(zip(*(readings(h, n_last) for h in members)))  # per reading, one value per member
        cells = [_spread(values, digits) for values, digits in zip(figures, (2, 4, 2, 2))]
        rows.append([str(trained) if planned in (None, trained) else f"{trained}/{planned}", *cells])
    header = ["epochs", "val acc %", "val loss", "best %", f"last-{n_last} mean %"]
    names = short_names([r["name"] for r in loaded])
    keys, columns, rest = differing([r["config"] for r in loaded]), [["run", *names]], []
    fixed = [[h, *(row[i] for row in rows)] for i, h in enumerate(header)]
    used = sum(max(map(len, c)) + 2 for c in columns + fixed)
    for k in keys:
        column = [k, *(_cell(r["config"].get(k)) for r in loaded)]
        if used + max(map(len, column)) + 2 <= width:
            columns.append(column)
            used += max(map(len, column)) + 2
        else:
            rest.append(k)
    columns += fixed
    widths = [max(map(len, c)) for c in columns]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    out = [line([c[i] for c in columns]) for i in range(len(loaded) + 1)]
    out.insert(1, line(["-" * w for w in widths]))
    if rest:
        out.append("other settings that differ:")
    for name, r in zip(names, loaded) if rest else ():
        settings = ", ".join(f"{k}={_cell(r['config'].get(k))}" for k in rest)
        out += textwrap.wrap(f"{name}: {settings}", width, subsequent_indent="    ", break_on_hyphens=False)
    return "\n".join(out)


def curves(entry: dict) -> dict:
    """plot_runs' curves of a run, or of a seeds group: the mean with its sd per epoch."""
    return seeds.mean_curves([m["history"] for m in entry.get("members", [entry])],
                             {**seeds.CURVES, "val_loss": val_losses})


def plot_path(given, loaded: list, overwrite: bool) -> Path:
    """Where the plot goes, checked as it will be written (matplotlib adds .png to a name without one): one rule
    for the default and --out, an existing file only with --overwrite, never a file cifarjax did not write in a run
    folder (the default plot goes beside it)."""
    path = Path(loaded[0]["folder"]) / DEFAULT_PLOT if given is None else Path(given).expanduser()
    path = plots.output_path(path)  # a folder is refused there
    target = runs.RunFolder.free_name(path)
    if given is not None and target != path:
        raise UserError(f"--out {path} is a file in a run folder that cifarjax did not write; choose another --out")
    if target.exists() and not overwrite:
        raise UserError(f"{target} exists; pass --overwrite to replace it, or choose another file with --out")
    return path


@exit_on_user_error
def main(argv=None) -> None:
    p = Parser(prog="python -m experiments.compare", description=" ".join(__doc__.split("\n\n")[0].split()))
    p.add_argument("runs", nargs="+", help="run folders: the --out of cnn or finetune runs (a fine-tune's several "
                                            "lengths are each compared), or one length's folder")
    p.add_argument("--out", "--plot", dest="plot", default=None, metavar="PATH",
                   help=f"where to write the plot: .png (added when missing), .pdf or .svg (default: the first "
                        f"run's {DEFAULT_PLOT}; beside a file of that name that cifarjax did not write)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing plot (the default one or --out; never a file cifarjax did not write in a "
                        "run folder)")
    args = p.parse_args(argv)
    loaded = [entry for folder in args.runs for entry in (seed_groups(folder) if seeds.is_seeds_folder(folder)
                                                           else map(load_run, expand(folder)))]
    plot = plot_path(args.plot, loaded, args.overwrite)
    print(table(loaded))
    names = legend_labels(short_names([r["name"] for r in loaded]), loaded)
    plot = plots.plot_runs({n: curves(r) for n, r in zip(names, loaded)}, plot,
                           title="Validation and training accuracy and validation loss per epoch")
    print(f"plot: {plot}")


if __name__ == "__main__":
    main()
