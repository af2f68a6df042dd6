"""The original's SimpleCNN experiment: train from scratch on CIFAR-10, 20 epochs, batch 64, Adam 1e-3.

    python -m experiments.cnn --data-dir DIR
"""
from __future__ import annotations

from experiments import common
from cifarjax import plots, runs
from cifarjax.config import Config
from cifarjax.errors import exit_on_user_error
from cifarjax.loop import train_loop


@exit_on_user_error
def main(argv=None) -> None:
    defaults = Config()
    parser = common.make_parser("python -m experiments.cnn", __doc__.splitlines()[0], defaults)
    parser.add_argument("--epochs", type=common.positive_int, default=defaults.n_epochs, help="training epochs")
    args = parser.parse_args(argv)
    config = common.config_from_args(args, n_epochs=args.epochs, model="simple_cnn")
    run = runs.prepare_run_dir(args.out, "cnn", args.overwrite, args.resume)
    dataset, train, val = common.load_splits(config)
    if args.resume:
        runs.check_resume_config(run, config.to_dict())
    runs.write_json(run / runs.CONFIG, config.to_dict())
    result = train_loop(config, train, val, run=run, resume=args.resume)
    runs.write_json(run / runs.CONFIG, config.to_dict())  # with the resolved normalisation
    h = result.history
    plots.plot_training_results(h.train_loss, h.val_accuracy, h.val_epoch, run / runs.PLOTS / "training_results.png")
    scored = (dataset.test, "test") if dataset.test is not None else (val, "val")
    summary = {"experiment": "cnn", "epochs": config.n_epochs, "train_accuracy": h.train_accuracy[-1],
               "train_loss": h.train_loss[-1], "val_accuracy": h.epoch_val_accuracy[-1],
               "val_accuracy_per_epoch": h.epoch_val_accuracy, "wall_seconds": round(result.seconds, 2),
               "images_per_second": round(result.images_per_second, 1), "n_train": len(train), "n_val": len(val),
               **common.report_split(config, result.variables, *scored, run), **common.environment()}
    runs.write_json(run / runs.SUMMARY, summary)
    print(f"validation accuracy {summary['val_accuracy']:.4f} after {config.n_epochs} epochs "
          f"({summary['wall_seconds']:.0f} s, {summary['images_per_second']:.0f} images/s); run folder: {run}")


if __name__ == "__main__":
    main()
