"""Answer the original's question: why did the fine-tuned ResNet-18 do worse than the small CNN?

    python -m experiments.study --data-dir DIR --weights imagenet|PATH|random [--epochs 10] [--subset N]
    python -m experiments.study --resume --out STUDY

Runs the baseline (the original's setting: 32x32, head only, BatchNorm in train mode, no normalisation,
Adam 1e-3, batch 64), one change per hypothesis (224x224 inputs; layer4 or everything trains; lr 1e-4 and
1e-2; ImageNet normalisation; frozen BatchNorm), the changes that helped combined, and the SimpleCNN
reference. Writes study.json, study.md, plots/study.png and plots/study_curves.png; each cell is a run folder
under STUDY/cells/. Default 10 epochs per cell: several hours on a GPU-less laptop at full size (use --subset),
a short run on one GPU.
"""
from __future__ import annotations

from experiments import common
from cifarjax.errors import UserError, exit_on_user_error
from cifarjax.flags import Parser, add_config_flags, given
from cifarjax.target import deterministic, runs_on_cpu
from cifarjax.recipes import recipe_config
from cifarjax.study import BASELINE, DEFAULT_EPOCHS, DEFAULT_GRID, REFERENCE, Cell, recorded, study

FLAGS = ("seed", "batch_size", "weights", "conv_impl", "precision", "steps_per_call", "deterministic", "dataset",
         "data_dir", "decode_size", "subset", "eval_batch_size", "classes")


def parser():
    p = Parser(prog="python -m experiments.study", description=__doc__.splitlines()[0])
    add_config_flags(p, "study", recipe_config("finetune").replace(**BASELINE), "the baseline's settings", only=FLAGS)
    p.add_argument("--epochs", type=int, default=None, help=f"epochs per cell (default: {DEFAULT_EPOCHS}; on resume, "
                                                               "the study's own)")
    p.add_argument("--cells", nargs="+", default=None, metavar="NAME",
                   help=f"run only these cells (baseline always): {', '.join(c.name for c in DEFAULT_GRID)}, "
                        f"{REFERENCE.name}")
    p.add_argument("--cnn-run", default=None, metavar="RUN",
                   help="take the SimpleCNN reference from this finished experiments.cnn run instead of training it")
    p.add_argument("--out", default=None, help="the study folder (default: runs/study-<timestamp>)")
    p.add_argument("--overwrite", action="store_true", help="replace the study in --out (only one cifarjax made)")
    p.add_argument("--resume", action="store_true",
                   help="skip finished cells and resume an interrupted one, with the study's own cells, settings and "
                        "data")
    return p


def grid_for(names):
    """The default grid, or the named part of it (the baseline is always included)."""
    if names is None:
        return DEFAULT_GRID, True
    known = {c.name: c for c in DEFAULT_GRID + (REFERENCE,)}
    unknown = sorted(set(names) - set(known))
    if unknown:
        raise UserError(f"unknown cell(s) {', '.join(unknown)}; choose from {', '.join(known)}")
    return tuple(c for c in DEFAULT_GRID if c.name == "baseline" or c.name in names), REFERENCE.name in names


@exit_on_user_error
def main(argv=None) -> None:
    args = parser().parse_args(argv)
    grid, want_reference = grid_for(args.cells)
    combine = args.cells is None
    typed = given(args, "study")
    if args.epochs is not None:
        typed["n_epochs"] = args.epochs
    if args.resume and args.out is not None:  # what was not typed is the study's own
        record = recorded(args.out)
        settings = record.get("settings") or {}  # none: a study made before they were recorded
        saved_dir = record.get("data_dir") if settings else None
        typed = {**{k: v for k, v in settings.items() if k in FLAGS + ("n_epochs",)},
                 **({"data_dir": saved_dir} if saved_dir else {}), **typed}
        own = record.get("grid") if args.cells is None else None  # none: a study made before it was recorded
        if own:  # the study's own cells, reference and combination
            grid = tuple(Cell(**c) for c in own["cells"])
            want_reference, combine = own["train_reference"], own["combine"]
    if typed.get("deterministic") and not runs_on_cpu():
        deterministic()  # before the backend starts
    answer = study(typed.pop("data_dir", None), typed.pop("weights", "imagenet"), grid,
                   epochs=typed.pop("n_epochs", DEFAULT_EPOCHS), subset=typed.pop("subset", 0), out=args.out,
                   resume=args.resume, overwrite=args.overwrite, cnn_run=args.cnn_run, train_reference=want_reference,
                   combine=combine, **typed)
    print(f"{answer['weights']}; study folder: {answer['folder']} (study.md, study.json, plots/); noise "
          f"±{answer['noise_points']:.2f} points")


if __name__ == "__main__":
    common.launch(main)
