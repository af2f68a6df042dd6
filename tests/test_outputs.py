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
    from cifarjax.config import Config
    from cifarjax.data import load_dataset
    train_only = make_image_folder(tmp_path / "train_only", n_train=20, n_test=0, learnable=True)
    dataset = load_dataset(str(train_only))
    split, name = evaluate.choose_split(dataset, Config(), "auto", train_only)
    assert name == "val" and len(split) == 12  # the seeded 20% of 3 classes x 20 images
    # Other data's validation split is not the run's: evaluate refuses it, naming what differs (runs.check_data).
    with pytest.raises(SystemExit):
        evaluate.main([str(two_runs[0] / "a"), "--data-dir", str(train_only), "--json"])
    assert "differs from the run's" in capsys.readouterr().err


def test_compare_tables_the_differing_settings_and_readings(two_runs, tmp_path, capsys):
    root = two_runs[0]
    compare.main([str(root / "a"), str(root / "b"), "--plot", str(tmp_path / "cmp.png")])
    out = capsys.readouterr().out
    header = out.splitlines()[0].split()
    assert header[:3] == ["run", "lr", "seed"] and "batch_size" not in header and "n_epochs" not in header
    assert out.splitlines()[2].split()[:2] == ["a", "0.001"]  # runs named without the folder they share
    assert "val acc %" in out and "val loss" in out and "best %" in out and "last-2 mean %" in out  # 2 epochs ran
    assert (tmp_path / "cmp.png").is_file()
    with pytest.raises(SystemExit):
        compare.main([str(root / "a"), "--plot", str(tmp_path / "cmp.png")])  # never overwrites silently


def test_compare_table_fits_100_columns_and_lists_the_settings_that_do_not_fit():
    from cifarjax.loop import History
    records = [{"epoch": 1.0, "epoch_end": True, "val_accuracy": 0.5, "val_loss": 1.2, "train_accuracy": 0.4}]
    keys = ["learning_rate_schedule_name", "label_smoothing", "weight_decay", "crop_padding", "optimizer",
            "dropout", "ema_decay", "normalize", "warmup_epochs"]
    loaded = [{"name": f"runs/experiment-number-{i}", "history": History(records),
               "config": {**{k: f"value-{k}-{i}" for k in keys}, "n_epochs": 1 + i}} for i in range(2)]
    lines = compare.table(loaded).splitlines()
    assert max(map(len, lines)) <= 100 and "n_epochs" not in lines[0]
    assert lines[2].startswith("experiment-number-0") and "1/2" in lines[3]  # run 1 trained 1 of its 2 epochs
    listed = "\n".join(lines[4:])
    assert all(k in lines[0] or f"{k}=value-{k}-1" in listed for k in keys)


def test_compare_writes_into_the_first_run_by_default_and_checks_the_written_path(two_runs, tmp_path, capsys):
    root = two_runs[0]
    compare.main([str(root / "a"), str(root / "b")])
    assert (root / "a" / "plots" / "comparison.png").is_file()
    assert not (root.parent / "comparison.png").exists() and not os.path.exists("comparison.png")
    (tmp_path / "mine.png").write_bytes(b"a user's own picture")
    with pytest.raises(SystemExit):
        compare.main([str(root / "a"), "--out", str(tmp_path / "mine")])  # matplotlib would write mine.png
    assert (tmp_path / "mine.png").read_bytes() == b"a user's own picture"
    assert "mine.png exists; pass --overwrite" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        compare.main([str(root / "a"), "--plot", str(tmp_path / "out.txt")])
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "error:" in err and ".txt" in err and "Traceback" not in err
    assert not (tmp_path / "out.txt").exists()


def test_compare_takes_a_folder_of_several_runs_as_each_of_them(two_runs, tmp_path, capsys):
    """A fine-tune's --out holds epochs-20, epochs-50 and epochs-100: compared in that order."""
    import shutil
    for length, run in (("100", "b"), ("20", "a")):
        shutil.copytree(two_runs[0] / run, tmp_path / "finetune" / f"epochs-{length}")
    compare.main([str(tmp_path / "finetune"), "--plot", str(tmp_path / "cmp.png")])
    rows = [line.split()[0] for line in capsys.readouterr().out.splitlines()[2:4]]
    assert rows == ["epochs-20", "epochs-100"] and (tmp_path / "cmp.png").is_file()


def test_compare_reads_a_metrics_file_whose_last_line_was_cut_by_a_crash(two_runs, tmp_path, capsys):
    import shutil
    run = tmp_path / "cut"
    shutil.copytree(two_runs[0] / "a", run)
    with open(run / runs.METRICS, "a") as f:
        f.write('{"step": 9, "epoch": 2.4, "train_lo')
    compare.main([str(run), "--out", str(tmp_path / "c.png")])
    out, err = capsys.readouterr()
    assert "is incomplete" in err and "Traceback" not in err and "val acc %" in out
    (run / runs.METRICS).write_text('{"broken\n' + (two_runs[0] / "a" / runs.METRICS).read_text())
    with pytest.raises(SystemExit):
        compare.main([str(run), "--out", str(tmp_path / "d.png")])
    assert "line 1 of" in capsys.readouterr().err


def test_compare_help_is_whole_sentences(capsys):
    with pytest.raises(SystemExit):
        compare.main(["--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "last five epochs." in out and "--out PATH" in out


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
    assert len(lines) == 3 and len({line.get_linestyle() for line in lines}) == 3
    assert len({line.get_marker() for line in lines}) == 3
    # the 50- and 100-epoch runs continue the shorter ones: each is drawn from where the one it continues ends
    assert [(l.get_xdata()[0], l.get_xdata()[-1]) for l in lines] == [(1, 20), (20, 50), (50, 100)]
    assert "continues 20 epochs" in lines[1].get_label() and "continues 50 epochs" in lines[2].get_label()
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
    gap_x, gap_y = 3, 8  # 1.6 inches per 35-pixel column: 0.36 inches of title is 8 pixels
    row, col = 32 + gap_y, 32 + gap_x
    assert canvas.shape == (3 * row, 4 * col, 3)  # 3 rows of 4, each image with room for its title, no more
    np.testing.assert_array_equal(canvas[gap_y:row, 1:33], images[0])
    np.testing.assert_array_equal(canvas[2 * row + gap_y:3 * row, col + 1:col + 33], images[9])


def test_confusion_plot_has_counts_rates_and_accuracy(monkeypatch):
    figures = captured_figure(monkeypatch)
    plots.plot_confusion_matrix(np.array([[8, 2], [1, 9]]), ["a", "b"], "x.png", title="Confusion")
    fig = figures[0]
    assert "accuracy 85.00%" in fig._suptitle.get_text()
    titles = [ax.get_title() for ax in fig.axes]
    assert "counts" in titles and "row-normalised (%)" in titles


def test_runs_that_only_share_a_prefix_by_chance_are_drawn_whole(monkeypatch):
    figures = captured_figure(monkeypatch)
    plots.plot_runs({"a": {"val": [0.1, 0.2]}, "b": {"val": [0.1, 0.3, 0.4]}}, "x.png", "t")
    assert [len(l.get_xdata()) for l in figures[0].axes[0].get_lines()] == [2, 3]


def test_long_titles_are_wrapped_inside_their_figure(tmp_path):
    """study_curves.png's title was cut at both edges: every title must lie inside its figure."""
    title = "Validation accuracy per epoch: ResNet-18 fine-tuning study (" + "weights not ImageNet's, " * 6 + ")"
    drawn = []
    real_save = plots._save

    def save(fig, path):
        fig.canvas.draw()
        box, width = fig._suptitle.get_window_extent(), fig.bbox.width
        drawn.append((box.x0 >= 0 and box.x1 <= width, fig._suptitle.get_text().count("\n")))
        return real_save(fig, path)
    import unittest.mock
    with unittest.mock.patch.object(plots, "_save", save):
        plots.plot_runs({f"cell{i}": {"val": [0.3, 0.4]} for i in range(9)}, tmp_path / "c.png", title)
        plots.plot_study_effects({"cells": [{"name": "baseline", "effect_points": 0.0, "val_accuracy": 0.3}],
                                  "noise_points": 1.0}, tmp_path / "s.png", title)
    assert drawn == [(True, drawn[0][1]), (True, drawn[1][1])] and drawn[0][1] >= 1


def test_a_plot_path_is_checked_as_it_will_be_written(tmp_path):
    assert plots.output_path(tmp_path / "out") == tmp_path / "out.png"
    assert plots.output_path(tmp_path / "out.pdf") == tmp_path / "out.pdf"
    from cifarjax.errors import UserError
    with pytest.raises(UserError, match=r"\.txt is not an image format matplotlib writes; use \.png, \.pdf or \.svg"):
        plots.output_path(tmp_path / "out.txt")


def test_tensorboard_has_the_training_loss_between_evaluations(tmp_path):
    """The loss every 25 steps (each read of the queued steps' metrics), not only at evaluations."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from cifarjax.config import Config
    from cifarjax.loop import train_loop
    from tests.test_train import tiny_split
    config = Config(batch_size=2, num_classes=3, eval_every=0, conv_impl="xla", n_epochs=1, checkpoint_seconds=0)
    train_loop(config, tiny_split(60), tiny_split(6, seed=1), run=tmp_path)  # 30 steps, one evaluation
    events = EventAccumulator(str(tmp_path / runs.TENSORBOARD))
    events.Reload()
    read = lambda tag: [e.step for e in (events.Tensors(tag) if tag in events.Tags()["tensors"]  # noqa: E731
                                         else events.Scalars(tag))]
    assert read("val/accuracy") == [30] and read("train/loss_recent_steps") == [25, 30]
