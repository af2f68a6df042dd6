"""What a researcher reads: summaries whose timings add up, TensorBoard files, the evaluation table, the
comparison of runs, and plots that show the data."""
import json
import os
import stat

import numpy as np
import pytest

from cifarjax import plots, runs
from experiments import cnn, compare, evaluate
from tests.helpers import make_image_folder


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    """Two 2-epoch SimpleCNN runs that differ in their seed and learning rate."""
    root = tmp_path_factory.mktemp("outputs")
    data = make_image_folder(root / "data", n_train=20, n_test=6, learnable=True)
    for name, extra in (("a", []), ("b", ["--seed", "1", "--lr", "0.002"])):
        cnn.main(["--data-dir", str(data), "--epochs", "2", "--batch-size", "8", "--conv-impl", "xla",
                  "--eval-every", "3", "--out", str(root / name), *extra])
    return root, data


def test_summary_phases_add_up_to_the_process_and_record_provenance(two_runs):
    summary = json.loads((two_runs[0] / "a" / runs.SUMMARY).read_text())
    phases = summary["phases"]
    assert {"data_loading", "compilation", "training", "evaluation", "plotting", "other"} <= set(phases)
    assert abs(sum(phases.values()) - summary["process_seconds"]) <= 0.01 * len(phases)  # each rounded to 0.01 s
    assert all(v >= 0 for v in phases.values())
    assert summary["images_per_second"] > 0 and summary["process_seconds"] > summary["wall_seconds"] * 0.5
    assert summary["command"].startswith("python -m experiments.cnn --data-dir") and "--lr" not in summary["command"]
    for key in ("started", "command", "git_commit", "packages", "process_count", "device_count"):
        assert key in summary, key
    assert summary["packages"]["jax"] and summary["packages"]["flax"]


def test_run_files_are_ordinary_files_a_team_can_read(two_runs):
    umask = os.umask(0)
    os.umask(umask)
    for name in (runs.CONFIG, runs.SUMMARY, runs.METRICS):
        assert stat.S_IMODE((two_runs[0] / "a" / name).stat().st_mode) == 0o666 & ~umask, name


def test_metrics_record_validation_loss_and_learning_rate(two_runs):
    records = runs.read_metrics(two_runs[0] / "b")
    assert all({"val_loss", "lr", "val_accuracy"} <= set(r) for r in records)
    assert records[0]["lr"] == 0.002 and [r["epoch_end"] for r in records if "epoch_end" in r] == [True, True]


def test_tensorboard_scalars_read_back_with_tensorboards_reader(two_runs):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(two_runs[0] / "a" / runs.TENSORBOARD))
    events.Reload()
    tags = set(events.Tags()["tensors"]) | set(events.Tags()["scalars"])
    assert {"train/loss", "val/accuracy", "val/loss", "lr", "images_per_second"} <= tags
    values = events.Tensors("val/accuracy") if "val/accuracy" in events.Tags()["tensors"] else \
        events.Scalars("val/accuracy")
    records = runs.read_metrics(two_runs[0] / "a")
    assert [v.step for v in values] == [r["step"] for r in records]


def test_evaluate_prints_a_table_and_full_json(two_runs, capsys):
    root = two_runs[0]
    evaluate.main([str(root / "a")])
    out, err = capsys.readouterr()
    assert "accuracy" in out and "per class:" in out and "cat" in out and "most confused" in out
    assert "scored the test split" in err
    evaluate.main([str(root / "a"), "--json"])
    result = json.loads(capsys.readouterr().out)
    assert result["split"] == "test" and result["n"] == 18 and len(str(result["accuracy"])) <= 7


def test_evaluate_picks_validation_when_the_data_has_no_test_split(two_runs, tmp_path, capsys):
    train_only = make_image_folder(tmp_path / "train_only", n_train=20, n_test=0, learnable=True)
    evaluate.main([str(two_runs[0] / "a"), "--data-dir", str(train_only), "--json"])
    assert json.loads(capsys.readouterr().out)["split"] == "val"


def test_compare_tables_the_differing_settings_and_readings(two_runs, tmp_path, capsys):
    root = two_runs[0]
    compare.main([str(root / "a"), str(root / "b"), "--plot", str(tmp_path / "cmp.png")])
    out = capsys.readouterr().out
    header = out.splitlines()[0].split()
    assert "lr" in header and "seed" in header and "batch_size" not in header
    assert "final" in out and "best" in out and "last-5" in out and len(out.splitlines()) >= 4
    assert (tmp_path / "cmp.png").is_file()
    with pytest.raises(SystemExit):
        compare.main([str(root / "a"), "--plot", str(tmp_path / "cmp.png")])  # never overwrites silently


def captured_figure(monkeypatch):
    """Capture the figure a plot function would save."""
    figures = []
    monkeypatch.setattr(plots, "_save", lambda fig, path: figures.append(fig) or path)
    return figures


def test_fine_tuning_plot_tells_the_runs_apart_and_does_not_zoom_silently(monkeypatch):
    figures = captured_figure(monkeypatch)
    curves = {f"{n} epochs": {"val": list(0.40 + 0.001 * np.arange(n)), "train": list(0.5 + 0.002 * np.arange(n))}
              for n in (20, 50, 100)}
    plots.plot_runs(curves, "x.png", "t")
    val_ax, train_ax = figures[0].axes[:2]
    lines = val_ax.get_lines()
    assert len(lines) == 3 and len({l.get_linestyle() for l in lines}) == 3 and len({l.get_marker() for l in lines}) == 3
    low, high = val_ax.get_ylim()
    assert high - low >= plots.MIN_SPAN and "axis from" in val_ax.get_ylabel()
    assert len(train_ax.get_lines()) == 3


def test_training_plot_shares_the_epoch_axis_and_a_single_epoch_is_readable(monkeypatch):
    figures = captured_figure(monkeypatch)
    records = [{"step": 5, "epoch": 1.0, "train_loss": 1.1, "train_accuracy": 0.4, "val_accuracy": 0.5, "val_loss": 1.0,
                "epoch_end": True}]
    plots.plot_training_results(records, "x.png")
    loss_ax, acc_ax = figures[0].axes[:2]
    assert loss_ax.get_xlim() == acc_ax.get_xlim() and loss_ax.get_xlim()[0] == 0 and loss_ax.get_xlim()[1] > 1
    assert len(loss_ax.get_lines()) == 2 and len(acc_ax.get_lines()) == 2  # training and validation in both


def test_sample_predictions_place_every_image_under_its_marked_title(monkeypatch):
    figures = captured_figure(monkeypatch)
    images = np.random.default_rng(0).integers(0, 256, (10, 32, 32, 3), dtype=np.uint8)
    plots.plot_sample_predictions(images, [0, 1] * 5, [0] * 10, ["a", "b"], "x.png", columns=4)
    ax, = figures[0].axes
    titles = [t.get_text() for t in ax.texts]
    assert len(titles) == 10 and titles[:2] == ["✓ a\n(a)", "✗ b\n(a)"]
    assert {t.get_color() for t in ax.texts} == {plots.PALETTE[0], plots.PALETTE[1]}
    canvas = ax.get_images()[0].get_array()
    assert canvas.shape == (3 * 64, 4 * 40, 3)  # 3 rows of 4, each image with room for its title
    np.testing.assert_array_equal(canvas[32:64, 4:36], images[0])
    np.testing.assert_array_equal(canvas[2 * 64 + 32:3 * 64, 40 + 4:40 + 36], images[9])


def test_confusion_plot_has_counts_rates_and_accuracy(monkeypatch):
    figures = captured_figure(monkeypatch)
    plots.plot_confusion_matrix(np.array([[8, 2], [1, 9]]), ["a", "b"], "x.png", title="Confusion")
    fig = figures[0]
    assert "accuracy 85.00%" in fig._suptitle.get_text()
    titles = [ax.get_title() for ax in fig.axes]
    assert "counts" in titles and "row-normalised (%)" in titles
