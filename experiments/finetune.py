"""The original's fine-tuning experiment: ResNet-18 with a frozen backbone and a new 10-class head.

    python -m experiments.finetune --epochs 100 --weights resnet18-f37072fd.pth --data-dir DIR
    python -m experiments.finetune --resume --out RUN
    python -m experiments.finetune --seeds 0 1 2 --out RUN     (once per seed; accuracy as mean ± sd)

With several --epochs values (default 20 50 100, like the original) each is its own run under
--out/epochs-N and their curves are drawn together in --out/plots/fine_tuning_results.png. With a constant
learning rate a longer run's first epochs are exactly a shorter one's, so it starts from the shorter run's
final checkpoint, as resuming it would (bit for bit the same as training it from the start). The lengths
share one frozen backbone file, --out/frozen_params.npz, which each records with its SHA-256.

A resumed run never rebuilds its frozen backbone from --weights: it comes from the run's own saved
parameters, and the weights file is read only where a length has not started yet (and must then be the file
the run started from).
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from experiments import common, seeds
from cifarjax import distributed, plots, runs
from cifarjax.checkpoint import FROZEN, digest, frozen_params, join_frozen, latest_epoch, load_variables, \
    split_frozen, write_frozen_file
from cifarjax.errors import exit_on_user_error
from cifarjax.runs import write_json
from cifarjax.flags import given, rate_depends_on_length
from cifarjax.freezing import Freezing
from cifarjax.inputs import backbone_features, cacheable
from cifarjax.loop import fine_tune_loop
from cifarjax.models import build_model
from cifarjax.pretrained import Weights, sha256_file, starting_weights, weights_file
from cifarjax.text import plural

DEFAULT_EPOCHS = (20, 50, 100)


def epoch_counts(args) -> list:
    """The --epochs values (one run each); on resume without --epochs, the run's own."""
    if hasattr(args, "n_epochs"):
        return list(dict.fromkeys(args.n_epochs))
    if args.resume and (Path(args.out or "") / runs.CONFIG).is_file():
        saved = runs.read_config(args.out)
        return saved.get("epoch_counts") or [saved["n_epochs"]]
    return list(DEFAULT_EPOCHS)


@exit_on_user_error
def main(argv=None) -> None:
    args = common.parse("finetune", __doc__.splitlines()[0], argv, nargs={"n_epochs": "+"},
                        shown={"n_epochs": " ".join(map(str, DEFAULT_EPOCHS))})
    seeds.run("finetune", args, fine_tune)


def fine_tune(args) -> None:
    counts = epoch_counts(args)
    typed = {**given(args, "finetune"), "n_epochs": max(counts)}
    s = common.start("finetune", args, typed, model="resnet18")
    nested = len(counts) > 1
    with s.phases("weights", f"loading weights ({s.config.weights})"):
        variables, weights = resumed_weights(s, counts, nested) if s.resume else starting_weights(s.config)
    frozen = split_params(s.config, variables)[1]
    bound = {"weights_label": weights.description, "weights_file": weights.source, "weights_sha256": weights.sha256,
             **({"frozen_params": {"path": FROZEN, "sha256": digest(frozen)}} if frozen else {})}
    common.open_run(s, "finetune", {**s.config.to_dict(), "epoch_counts": counts, **bound})
    if frozen and distributed.is_writer() and not (s.run / FROZEN).is_file():
        write_frozen_file(frozen, s.run / FROZEN)
    weights_label = weights.description
    features = None
    if cacheable(s.config):
        with s.phases("feature_extraction", "extracting backbone features"):
            features = backbone_features(s.config, build_model(s.config), variables, s.train, s.val)
    results, folders = [], {}
    for n in counts:
        results.append(fine_tune_run(s, n, variables, features, bound, nested, shorter_run(s.config, folders, n)))
        folders[n] = run_folder(s, n, nested)
    if distributed.is_writer():
        with s.phases("plotting", "writing plots"):
            plots.plot_runs({f"{r['epochs']} epochs": {"val": r["val_accuracy_per_epoch"],
                                                       "train": r["train_accuracy_per_epoch"]} for r in results},
                            s.run / runs.PLOTS / "fine_tuning_results.png",
                            title=f"ResNet-18 fine-tuning ({weights_label}; trains: {s.config.unfreeze})")
        if len(counts) > 1:
            write_json(s.run / runs.SUMMARY, {"experiment": "finetune", "weights": weights_label,
                                              "weights_sha256": weights.sha256, "runs": [
                {k: r[k] for k in ("epochs", "val_accuracy", "best_val_accuracy", "last5_mean_val_accuracy",
                                   "wall_seconds")} for r in results], **s.phases.summary(),
                **common.provenance(s.command_line, s.commands),
                **common.environment()})
        print(f"{weights_label}; run folder: {s.run}; whole process {s.phases.summary()['process_seconds']:.0f} s")


def run_folder(s, n_epochs: int, nested: bool) -> Path:
    """Where the `n_epochs` run writes: --out itself, or --out/epochs-N when there are several."""
    return s.run / f"epochs-{n_epochs}" if nested else s.run


def shorter_run(config, folders: dict, n_epochs: int) -> Optional[Path]:
    """The folder of the finished run with the most epochs under `n_epochs` (`folders`: epochs -> folder), when
    its steps are this run's first ones (the learning rate does not depend on the run's length); else None."""
    shorter = [n for n in folders if n < n_epochs]
    return folders[max(shorter)] if shorter and not rate_depends_on_length(config) else None


def split_params(config, variables: dict) -> tuple:
    """(trained, frozen) parts of the parameters; the frozen part is {} when everything trains."""
    freezing = Freezing.from_config(config)
    if freezing.everything_trains:
        return variables["params"], {}
    return split_frozen(variables["params"], freezing.trainable_mask(variables["params"]))


def resumed_weights(s, counts: list, nested: bool) -> tuple:
    """(variables, `Weights`) of a resumed fine-tune. The frozen backbone always comes from the run's own file;
    the rest from the newest checkpoint of its lengths, or, where a length still has to start from the beginning,
    from the weights file, which must then be the one the run started from (same SHA-256)."""
    saved = s.saved
    weights = Weights(saved.get("weights_file") or s.config.weights, saved.get("weights_sha256"))
    started, fresh, folders = [], [], {}
    for n in counts:
        folder = run_folder(s, n, nested)
        if latest_epoch(folder) is not None:
            started.append(folder)
        elif shorter_run(s.config, folders, n) is None:
            fresh.append(n)
        folders[n] = folder
    if started and not fresh:
        variables = load_variables(started[-1])
    elif weights.pretrained:
        path = weights_file(s.config.weights)
        now = sha256_file(path) if path.is_file() else None
        runs.check_weights(weights.sha256, now, path, s.run,
                           f"its {plural(fresh[0], 'epoch')} fine-tune, which has not trained yet,")
        variables = starting_weights(s.config)[0]
    else:
        variables = starting_weights(s.config)[0]
    frozen = frozen_params(s.run) if (s.run / FROZEN).is_file() or saved.get("frozen_params") else {}
    if frozen:
        variables = {**variables, "params": join_frozen(split_params(s.config, variables)[0], frozen)}
    return variables, weights


def fine_tune_run(s, n_epochs: int, variables: dict, features, bound: dict, nested: bool,
                  continue_from: Optional[Path] = None) -> dict:
    """One fine-tune of `n_epochs` in its own run folder, from `continue_from`'s end when given; returns its
    summary. `bound`: the weights and frozen-file entries of config.json (a sub-run's path is relative to it)."""
    weights_label = bound["weights_label"]
    sub = run_folder(s, n_epochs, nested)
    config = s.config.replace(n_epochs=n_epochs)
    if nested and distributed.is_writer():
        runs.RunFolder(sub, "finetune").create()
        frozen = {"frozen_params": {**bound["frozen_params"], "path": f"../{FROZEN}"}} if "frozen_params" in bound \
            else {}
        write_json(sub / runs.CONFIG, {**config.to_dict(), **bound, **frozen, **s.binding})
    distributed.barrier(f"sub-run {n_epochs}")
    result = fine_tune_loop(config, variables, s.train, s.val, run=sub, resume=s.resume, features=features,
                            phases=s.phases, resume_hint=common.resume_hint("finetune", s.run),
                            restart_hint=common.restart_hint(s), continue_from=continue_from, report=False)
    scored = common.report_split(config, result, *common.scored_split(s), sub, s.phases)
    summary = common.run_summary("finetune", s, config, result, sub, weights=weights_label,
                                 weights_sha256=bound["weights_sha256"],
                                 unfreeze=config.unfreeze, bn=config.bn, cached_features=features is not None,
                                 n_train=len(s.train), n_val=len(s.val),
                                 continues=continue_from.name if continue_from else None, **scored)
    if distributed.is_writer():
        write_json(sub / runs.SUMMARY, summary)
        print(f"{plural(n_epochs, 'epoch')}: {common.closing_figures(summary)}"
              + (f" (continuing {continue_from.name})" if continue_from else ""))
    return summary


if __name__ == "__main__":
    common.launch(main)
