"""The original's fine-tuning experiment: ResNet-18 with a frozen backbone and a new 10-class head.

    python -m experiments.finetune --epochs 100 --weights resnet18-f37072fd.pth --data-dir DIR
    python -m experiments.finetune --resume --out RUN

With several --epochs values (default 20 50 100, like the original) each is its own run under
--out/epochs-N and their curves are drawn together in --out/plots/fine_tuning_results.png. With a constant
learning rate a longer run's first epochs are exactly a shorter one's, so it starts from the shorter run's
final checkpoint, as resuming it would (bit for bit the same as training it from the start).
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from experiments import common
from cifarjax import distributed, plots, runs
from cifarjax.errors import exit_on_user_error
from cifarjax.features import backbone_features, cacheable
from cifarjax.files import write_json
from cifarjax.flags import given
from cifarjax.loop import fine_tune_loop
from cifarjax.models import build_model
from cifarjax.optim import rate_depends_on_length
from cifarjax.pretrained import starting_weights
from cifarjax.text import plural

DEFAULT_EPOCHS = (20, 50, 100)


def epoch_counts(args) -> list:
    """The --epochs values (one run each); on resume without --epochs, the run's own."""
    if hasattr(args, "n_epochs"):
        return list(dict.fromkeys(args.n_epochs))
    saved = Path(args.out or "") / runs.CONFIG
    if args.resume and saved.is_file():
        return runs.read_json(saved).get("epoch_counts") or [runs.read_json(saved)["n_epochs"]]
    return list(DEFAULT_EPOCHS)


@exit_on_user_error
def main(argv=None) -> None:
    args = common.parse("finetune", __doc__.splitlines()[0], argv, nargs={"n_epochs": "+"},
                        shown={"n_epochs": " ".join(map(str, DEFAULT_EPOCHS))})
    counts = epoch_counts(args)
    typed = {**given(args, "finetune"), "n_epochs": max(counts)}
    s = common.start("finetune", args, typed, model="resnet18")
    with s.phases("weights", f"loading weights ({s.config.weights})"):
        variables, weights_label = starting_weights(s.config)
    common.open_run(s, "finetune", {**s.config.to_dict(), "epoch_counts": counts, "weights_label": weights_label})
    features = None
    if cacheable(s.config):
        with s.phases("feature_extraction", "extracting backbone features"):
            features = backbone_features(s.config, build_model(s.config), variables, s.train, s.val)
    results, folders = [], {}
    for n in counts:
        results.append(fine_tune_run(s, n, variables, features, weights_label, len(counts) > 1,
                                     shorter_run(s.config, folders, n)))
        folders[n] = run_folder(s, n, len(counts) > 1)
    if distributed.is_writer():
        with s.phases("plotting", "writing plots"):
            plots.plot_runs({f"{r['epochs']} epochs": {"val": r["val_accuracy_per_epoch"],
                                                       "train": r["train_accuracy_per_epoch"]} for r in results},
                            s.run / runs.PLOTS / "fine_tuning_results.png",
                            title=f"ResNet-18 fine-tuning ({weights_label}; trains: {s.config.unfreeze})")
        if len(counts) > 1:
            write_json(s.run / runs.SUMMARY, {"experiment": "finetune", "weights": weights_label, "runs": [
                {k: r[k] for k in ("epochs", "val_accuracy", "best_val_accuracy", "last5_mean_val_accuracy",
                                   "wall_seconds")} for r in results], **s.phases.summary(),
                **common.provenance(s.command_line, s.commands),
                **common.environment()})
        print(f"run folder: {s.run}; whole process {s.phases.summary()['process_seconds']:.0f} s")


def run_folder(s, n_epochs: int, nested: bool) -> Path:
    """Where the `n_epochs` run writes: --out itself, or --out/epochs-N when there are several."""
    return s.run / f"epochs-{n_epochs}" if nested else s.run


def shorter_run(config, folders: dict, n_epochs: int) -> Optional[Path]:
    """The folder of the finished run with the most epochs under `n_epochs` (`folders`: epochs -> folder), when
    its steps are this run's first ones (the learning rate does not depend on the run's length); else None."""
    shorter = [n for n in folders if n < n_epochs]
    return folders[max(shorter)] if shorter and not rate_depends_on_length(config) else None


def fine_tune_run(s, n_epochs: int, variables: dict, features, weights_label: str, nested: bool,
                  continue_from: Optional[Path] = None) -> dict:
    """One fine-tune of `n_epochs` in its own run folder, from `continue_from`'s end when given; returns its
    summary."""
    sub = run_folder(s, n_epochs, nested)
    config = s.config.replace(n_epochs=n_epochs)
    if nested and distributed.is_writer():
        runs.create(sub, "finetune")
        write_json(sub / runs.CONFIG, {**config.to_dict(), "weights_label": weights_label})
    distributed.barrier(f"sub-run {n_epochs}")
    result = fine_tune_loop(config, variables, s.train, s.val, run=sub, resume=s.resume, features=features,
                            phases=s.phases, resume_hint=common.resume_hint("finetune", s.run),
                            continue_from=continue_from)
    scored = common.report_split(config, result, *common.scored_split(s), sub, s.phases)
    summary = common.run_summary("finetune", s, config, result, weights=weights_label,
                                 unfreeze=config.unfreeze, bn=config.bn, cached_features=features is not None,
                                 n_train=len(s.train), n_val=len(s.val),
                                 continues=continue_from.name if continue_from else None, **scored)
    if distributed.is_writer():
        write_json(sub / runs.SUMMARY, summary)
        print(f"{plural(n_epochs, 'epoch')}: {common.closing_figures(summary)}"
              + (f" (continuing {continue_from.name})" if continue_from else ""))
    return summary


if __name__ == "__main__":
    main()
