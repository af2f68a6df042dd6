"""Compare runs: their validation curves in one plot, and a table of the settings that differ and their final,
best and last-five-mean validation accuracy.

    python -m experiments.compare RUN [RUN ...] [--plot comparison.png]
"""
from __future__ import annotations

from pathlib import Path

from cifarjax import plots, runs
from cifarjax.checkpoint import find_run
from cifarjax.errors import UserError, exit_on_user_error
from cifarjax.flags import Parser
from cifarjax.loop import History

IGNORED = ("classes", "norm_mean", "norm_std", "data_dir", "weights_label", "weights_file", "weights_sha256",
           "data_fingerprint", "commands", "frozen_params")


def load_run(folder) -> dict:
    """A run's name, config and history (from its config.json and metrics.jsonl)."""
    run = find_run(folder) if not (Path(folder) / runs.METRICS).is_file() else Path(folder)
    records = runs.read_metrics(run)
    if not records:
        raise UserError(f"{run} has no evaluations in {runs.METRICS} yet; pass a run that finished an epoch")
    return {"name": str(folder), "config": runs.read_json(run / runs.CONFIG), "history": History(records)}


def differing(configs: list) -> list:
    keys = sorted({k for c in configs for k in c} - set(IGNORED))
    return [k for k in keys if len({repr(c.get(k)) for c in configs}) > 1]


def table(loaded: list) -> str:
    """Settings that differ, then final, best and last-five-mean validation accuracy, one row per run."""
    keys = differing([r["config"] for r in loaded])
    header = ["run", *keys, "epochs", "final %", "best %", "last-5 mean %"]
    rows = []
    for r in loaded:
        read = r["history"].readings()
        rows.append([r["name"], *[str(r["config"].get(k)) for k in keys], str(len(r["history"].epoch_val_accuracy)),
                     *[f"{100 * read[k]:.2f}" if k in read else "-" for k in
                       ("val_accuracy", "best_val_accuracy", "last5_mean_val_accuracy")]])
    widths = [max(len(x) for x in col) for col in zip(header, *rows)]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths))  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])


@exit_on_user_error
def main(argv=None) -> None:
    p = Parser(prog="python -m experiments.compare", description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", help="run folders (the --out of cnn or finetune runs, or their sub-runs)")
    p.add_argument("--plot", default="comparison.png", help="where to write the plot (default: comparison.png)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --plot file")
    args = p.parse_args(argv)
    loaded = [load_run(folder) for folder in args.runs]
    plot = Path(args.plot)
    if plot.exists() and not args.overwrite:
        raise UserError(f"{plot} exists; pass --overwrite to replace it, or choose another --plot")
    print(table(loaded))
    plots.plot_runs({r["name"]: {"val": r["history"].epoch_val_accuracy, "train": r["history"].train_accuracy}
                     for r in loaded}, plot, title="Validation and training accuracy per epoch")
    print(f"plot: {plot}")


if __name__ == "__main__":
    main()
