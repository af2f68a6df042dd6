"""The original's SimpleCNN experiment: train from scratch on CIFAR-10, 20 epochs, batch 64, Adam 1e-3.

    python -m experiments.cnn --data-dir DIR [--recipe improved]
    python -m experiments.cnn --resume --out RUN
    python -m experiments.cnn --seeds 0 1 2 --out RUN        (once per seed; accuracy as mean ± sd)
"""
from __future__ import annotations

from experiments import common, seeds
from cifarjax import distributed, plots, runs
from cifarjax.errors import exit_on_user_error
from cifarjax.runs import write_json
from cifarjax.loop import train_loop
from cifarjax.text import plural


@exit_on_user_error
def main(argv=None) -> None:
    seeds.run("cnn", common.parse("cnn", __doc__.splitlines()[0], argv), train)


def train(args) -> None:
    s = common.start("cnn", args, model="simple_cnn")
    common.open_run(s, "cnn", s.config.to_dict())
    result = train_loop(s.config, s.train, s.val, run=s.run, resume=s.resume, phases=s.phases,
                        resume_hint=common.resume_hint("cnn", s.run), restart_hint=common.restart_hint(s),
                        report=False)  # the command writes its own, richer summary and plots
    if distributed.is_writer():
        with s.phases("plotting", "writing plots"):
            plots.plot_training_results(result.history.records, s.run / runs.PLOTS / "training_results.png",
                                        title=f"SimpleCNN ({s.config.recipe} recipe)",
                                        label_smoothing=s.config.label_smoothing)
    scored = common.report_split(s.config, result, *common.scored_split(s), s.run, s.phases)
    summary = common.run_summary("cnn", s, s.config, result, n_train=len(s.train), n_val=len(s.val), **scored)
    if distributed.is_writer():
        write_json(s.run / runs.SUMMARY, summary)
        print(f"{plural(s.config.n_epochs, 'epoch')}: {common.closing_figures(summary)}; whole process "
              f"{summary['process_seconds']:.0f} s; run folder: {s.run}")


if __name__ == "__main__":
    common.launch(main)
