"""The original's fine-tuning experiment: ResNet-18 with a frozen backbone and a new 10-class head.

    python -m experiments.finetune --epochs 100 --weights resnet18-f37072fd.pth --data-dir DIR

With several --epochs values (default 20 50 100, like the original) each is its own run under
--out/epochs-N and their validation curves are overlaid in --out/plots/fine_tuning_results.png.
"""
from __future__ import annotations

import jax

from experiments import common
from cifarjax import plots, runs
from cifarjax.config import BN_MODES, UNFREEZE_CHOICES, Config
from cifarjax.errors import exit_on_user_error
from cifarjax.features import cacheable
from cifarjax.loop import backbone_features, build_model, fine_tune_loop, init_variables, resolve_normalization
from cifarjax.pretrained import IMAGENET_FILE, imagenet_resnet18


def load_weights(spec: str, config: Config):
    """(variables, label) for --weights: 'imagenet', 'random' or a .pth path."""
    if spec == "random":
        return init_variables(build_model(config), config), "random initialisation (no pretraining)"
    if spec == "imagenet":
        return imagenet_resnet18(config.num_classes, seed=config.seed), "ImageNet (torchvision IMAGENET1K_V1)"
    return imagenet_resnet18(config.num_classes, weights=spec, seed=config.seed), f"torchvision file {spec}"


@exit_on_user_error
def main(argv=None) -> None:
    defaults = Config(model="resnet18", unfreeze="head", eval_every=0)
    parser = common.make_parser("python -m experiments.finetune", __doc__.splitlines()[0], defaults)
    parser.add_argument("--epochs", type=common.positive_int, nargs="+", default=[20, 50, 100],
                        help="one run per value; their validation curves are overlaid")
    parser.add_argument("--weights", default="imagenet",
                        help=f"'imagenet' (torchvision's weights, downloaded or cached), a local {IMAGENET_FILE}, "
                             "or 'random' (no pretraining, for comparison)")
    parser.add_argument("--unfreeze", choices=UNFREEZE_CHOICES, default=defaults.unfreeze,
                        help="what trains: the head (the original), head + layer4, or everything")
    parser.add_argument("--bn", choices=BN_MODES, default=defaults.bn,
                        help="frozen layers' BatchNorm: 'frozen' (inference mode) or 'train' (batch statistics "
                             "and running-statistics updates, PyTorch's behaviour in the original)")
    parser.add_argument("--no-feature-cache", action="store_true",
                        help="run the backbone every step even when its features could be cached")
    args = parser.parse_args(argv)
    epochs = list(dict.fromkeys(args.epochs))
    config = common.config_from_args(args, model="resnet18", unfreeze=args.unfreeze, bn=args.bn,
                                     cache_features=not args.no_feature_cache, n_epochs=max(epochs))
    run = runs.prepare_run_dir(args.out, "finetune", args.overwrite, args.resume)
    dataset, train, val = common.load_splits(config)
    variables, weights_label = load_weights(args.weights, config)
    config = resolve_normalization(config, train)
    if args.resume:
        runs.check_resume_config(run, config.to_dict())
    features = backbone_features(config, variables, train, val) if cacheable(config) else None
    runs.write_json(run / runs.CONFIG, {**config.to_dict(), "epochs": epochs, "weights": weights_label})
    curves, results = {}, []
    for n_epochs in epochs:
        sub = run / f"epochs-{n_epochs}" if len(epochs) > 1 else run
        (sub / runs.PLOTS).mkdir(parents=True, exist_ok=True)
        sub_config = Config.from_dict({**config.to_dict(), "n_epochs": n_epochs})
        runs.write_json(sub / runs.CONFIG, {**sub_config.to_dict(), "weights": weights_label})
        result = fine_tune_loop(sub_config, variables, train, val, run=sub, resume=args.resume, features=features)
        h = result.history
        curves[f"{n_epochs} epochs"] = h.epoch_val_accuracy
        scored = (dataset.test, "test") if dataset.test is not None else (val, "val")
        summary = {"experiment": "finetune", "epochs": n_epochs, "weights": weights_label,
                   "unfreeze": config.unfreeze, "bn": config.bn, "cached_features": features is not None,
                   "train_accuracy": h.train_accuracy[-1], "val_accuracy": h.epoch_val_accuracy[-1],
                   "best_val_accuracy": max(h.epoch_val_accuracy), "train_accuracy_per_epoch": h.train_accuracy,
                   "val_accuracy_per_epoch": h.epoch_val_accuracy, "wall_seconds": round(result.seconds, 2),
                   "images_per_second": round(result.images_per_second, 1),
                   **common.report_split(sub_config, result.variables, *scored, sub), **common.environment()}
        runs.write_json(sub / runs.SUMMARY, summary)
        results.append(summary)
        print(f"{n_epochs} epochs: validation accuracy {summary['val_accuracy']:.4f} "
              f"(best {summary['best_val_accuracy']:.4f}), {summary['wall_seconds']:.0f} s")
    plots.plot_fine_tuning_results(curves, run / runs.PLOTS / "fine_tuning_results.png",
                                   title=f"ResNet-18 fine-tuning ({weights_label}; trains: {config.unfreeze})")
    if len(epochs) > 1:
        runs.write_json(run / runs.SUMMARY, {"experiment": "finetune", "weights": weights_label, "runs": [
            {k: r[k] for k in ("epochs", "val_accuracy", "best_val_accuracy", "wall_seconds")} for r in results],
            **common.environment()})
    print(f"run folder: {run}")
    jax.effects_barrier()


if __name__ == "__main__":
    main()
