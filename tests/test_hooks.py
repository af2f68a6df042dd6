"""Research code's way into the loop: its hooks see every moment, may stop the fit early, and a library run writes
the files a command run writes."""
import json

import pytest

import cifarjax as cj
from cifarjax import runs
from tests.helpers import make_image_folder


class StopWhenFlat:
    """The README's example: stop once validation accuracy has not risen for `patience` evaluations."""

    def __init__(self, patience=1):
        self.patience, self.best, self.waited, self.moments = patience, -1.0, 0, []

    def after_call(self, trainer, call):
        self.moments.append(("call", call.end))

    def after_checkpoint(self, trainer, step):
        self.moments.append(("checkpoint", step))

    def after_evaluation(self, trainer, record):
        self.moments.append(("evaluation", record["step"]))
        self.best, self.waited = (record["val_accuracy"], 0) if record["val_accuracy"] > self.best else \
            (self.best, self.waited + 1)
        if self.waited >= self.patience:
            trainer.stop()

    def at_end(self, trainer):
        self.moments.append(("end", trainer.finished))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = make_image_folder(tmp_path_factory.mktemp("hooks") / "data", n_train=20, n_test=0, learnable=True)
    dataset = cj.load_dataset(str(folder))
    config = cj.Config(n_epochs=6, batch_size=8, conv_impl="xla", lr=1e-30, classes=dataset.classes)  # never improves
    return config, *cj.train_val_split(dataset, config.val_fraction, config.seed)


def test_a_hook_sees_each_moment_and_stops_the_fit_early(data, tmp_path):
    config, train, val = data
    hook = StopWhenFlat()
    result = cj.train_loop(config, train, val, run=tmp_path / "run", hooks=[hook])
    steps_per_epoch = len(train) // config.batch_size
    assert [e for e in hook.moments if e[0] == "evaluation"] == [("evaluation", steps_per_epoch),
                                                                 ("evaluation", 2 * steps_per_epoch)]
    assert ("checkpoint", 2 * steps_per_epoch) in hook.moments and hook.moments[-1] == ("end", True)
    assert len(result.history.epoch_val_accuracy) == 2  # stopped after the second epoch, not the sixth
    assert len(runs.read_metrics(tmp_path / "run")) == 2  # the loop's own metrics hook wrote them first


def test_a_library_run_writes_a_summary_and_plots_as_a_command_does(data, tmp_path):
    config, train, val = data
    cj.train_loop(config.replace(n_epochs=1), train, val, run=tmp_path / "run")
    summary = json.loads((tmp_path / "run" / runs.SUMMARY).read_text())
    assert summary["epochs"] == 1 and summary["val_accuracy_per_epoch"] == [summary["val_accuracy"]]
    assert summary["images_per_second"] > 0 and not summary["stopped_early"]
    assert {p.name for p in (tmp_path / "run" / runs.PLOTS).iterdir()} == {"training_results.png",
                                                                         "confusion_matrix.png",
                                                                         "sample_predictions.png"}
    assert cj.load_run(tmp_path / "run").records()[-1]["val_accuracy"] == summary["val_accuracy"]
