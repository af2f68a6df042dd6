"""Edges a new user met (issue 44): each fails on the code before its fix."""
import re
import sys
import threading

import matplotlib.pyplot as plt
import numpy as np
import pytest
from tqdm import tqdm

from cifarjax import data, plots, runs, torchlib
from cifarjax.checkpoint import find_run
from cifarjax.errors import UserError, warn


@pytest.fixture
def drawn(monkeypatch):
    """The figures a plot function draws, kept open for inspection (it still writes its file)."""
    figures = []
    monkeypatch.setattr(plt, "close", lambda fig=None: figures.append(fig))
    yield figures
    for fig in figures:
        plt.figure(fig.number) if fig is not None else None
    plt.close("all")


def test_a_one_epoch_run_among_longer_ones_gets_its_marker(tmp_path, drawn):
    curves = {name: {"val": list(np.linspace(0.2, 0.5, n)), "train": list(np.linspace(0.3, 0.6, n))}
              for name, n in (("long", 90), ("one", 1), ("other", 90))}
    plots.plot_runs(curves, tmp_path / "runs.png", title="t")
    for ax in drawn[0].axes[:2]:
        for line in ax.get_lines():
            start, every = line.get_markevery()
            assert start < len(line.get_xdata()), line.get_label()  # at least one marker drawn


@pytest.mark.parametrize("n", [1, 3, 5])
def test_a_few_classes_leave_the_confusion_matrix_labels_inside(tmp_path, drawn, n):
    names = ["automobile", "cat", "aeroplane", "dog", "truck"][:n]
    plots.plot_confusion_matrix(5 * np.eye(n, dtype=int), names, tmp_path / "c.png")
    fig = drawn[0]
    renderer, box = fig.canvas.get_renderer(), fig.bbox
    for ax in fig.axes[:2]:  # the two heatmaps (their colour bars follow)
        for label in (ax.xaxis.label, ax.yaxis.label):
            extent = label.get_window_extent(renderer)
            assert box.x0 <= extent.x0 and extent.x1 <= box.x1 and box.y0 <= extent.y0 and extent.y1 <= box.y1


def test_the_study_figure_states_the_noise_as_study_md_does(tmp_path, drawn):
    cells = [{"name": "baseline", "effect_points": 0.0, "val_accuracy": 0.6},
             {"name": "more", "effect_points": 9.0, "val_accuracy": 0.69}]
    plots.plot_study_effects({"cells": cells, "noise_points": 3.78}, tmp_path / "s.png", "t")
    [legend] = [ax.get_legend() for ax in drawn[0].axes if ax.get_legend()]
    [text] = [t.get_text() for t in legend.get_texts()]
    assert "±3.78" in text and "±7.56" in text
    [patch] = legend.get_patches()
    assert patch.get_edgecolor()[:3] != patch.get_facecolor()[:3]  # the swatch has a visible border


def test_a_smoothed_training_loss_is_labelled_as_such(tmp_path, drawn):
    records = [{"epoch": 1, "epoch_end": True, "train_loss": 1.2, "train_accuracy": 0.5, "val_loss": 1.0,
                "val_accuracy": 0.55}]
    plots.plot_training_results(records, tmp_path / "t.png", label_smoothing=0.1)
    labels = [line.get_label() for line in drawn[0].axes[0].get_lines()]
    assert any("label smoothing 0.1" in label for label in labels)


def test_figures_name_the_run_of_one_length_with_its_fine_tune(tmp_path):
    assert runs.run_name(tmp_path / "ft" / "epochs-20") == "ft/epochs-20"
    assert runs.run_name(tmp_path / "cnn-run") == "cnn-run"


def test_a_file_given_as_the_run_is_named_as_a_file(tmp_path):
    image = tmp_path / "photo.jpg"
    image.write_bytes(b"x")
    with pytest.raises(UserError, match=r"photo\.jpg is a file, not a run folder; .*the run, then the images"):
        find_run(image)


def test_resume_of_a_missing_folder_says_what_to_do(tmp_path):
    with pytest.raises(UserError, match="empty or missing; check the path, or leave out --resume"):
        runs.RunFolder.check(tmp_path / "missing", "cnn", resume=True)


def test_no_data_dir_and_no_torchvision_names_data_dir(tmp_path, monkeypatch):
    def broken(module):
        raise UserError(f"cannot import {module} (RuntimeError: x): fix: pip install ...")
    monkeypatch.setattr(torchlib, "load", broken)
    with pytest.raises(UserError, match=r"no --data-dir given.*cannot import torchvision.*pass --data-dir"):
        data._download_cifar10(tmp_path)


def test_warnings_from_threads_and_beside_a_progress_bar_are_lines_of_their_own(capsys):
    bar = tqdm(total=10, file=sys.stderr, mininterval=0)
    bar.update(3)
    threads = [threading.Thread(target=warn, args=(f"edge case {i}",)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    bar.close()
    lines = re.split(r"[\r\n]", capsys.readouterr().err)
    assert sorted(line for line in lines if "edge case" in line) == [f"warning: edge case {i}" for i in range(8)]


def test_compare_names_the_differing_settings_in_its_legend():
    from experiments import compare
    loaded = [{"config": {"lr": lr, "seed": 0, "unfreeze": u}} for lr, u in ((1e-3, "head"), (1e-2, "all"))]
    assert compare.legend_labels(["a", "b"], loaded) == ["a [lr=0.001, unfreeze=head]", "b [lr=0.01, unfreeze=all]"]
    assert compare.legend_labels(["a"], loaded[:1]) == ["a"]


@pytest.mark.parametrize("typed, meant", [("--learning-rate", "--lr"), ("--batchsize", "--batch-size"),
                                          ("--dropuot", "--dropout"), ("--zzz", None)])
def test_a_mistyped_flag_gets_the_flag_it_meant(typed, meant):
    from experiments import common
    with pytest.raises(UserError) as error:
        common.make_parser("cnn", "d").parse_args([typed, "1"])
    assert (f"did you mean {meant}?" in str(error.value)) if meant else "did you mean" not in str(error.value)


def test_tune_process_applies_the_commands_cpu_settings_to_a_script(tmp_path):
    """A script's first call gets what `python -m experiments.NAME` gets: the CPU's XLA flags (and huge pages by
    relaunching, not asked for here); after JAX's backend started it changes nothing and says so in one line."""
    import os
    import subprocess
    script = tmp_path / "script.py"
    script.write_text("import os, cifarjax as cj, jax\n"
                      "applied = cj.tune_process(relaunch=False)\n"
                      "print(applied['xla_flags'], 'ynn_fusion' in os.environ['XLA_FLAGS'], jax.device_count())\n"
                      "cj.tune_process()\n")
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          env={**env, "JAX_PLATFORMS": "cpu"})
    assert done.returncode == 0, done.stderr
    assert "True" in done.stdout and done.stderr == ("warning: tune_process() changed nothing: JAX's backend had "
                                                     "already started (a jax.numpy array, jax.devices(), a cifarjax "
                                                     "loop); call it first in the script\n")


def test_huge_pages_relaunch_only_a_script_run_from_the_shell(tmp_path):
    """tune_process relaunches what started the process: the script itself, never pytest or runpy running it."""
    import subprocess
    script = tmp_path / "script.py"
    script.write_text("import sys\nfrom cifarjax.cpu.process import _runs_the_main_script\n"
                      "print(_runs_the_main_script(sys.orig_argv))\n")
    runs_it = [[sys.executable, str(script)], [sys.executable, "-m", "script"],
               [sys.executable, "-c", f"import runpy; runpy.run_path({str(script)!r}, run_name='__main__')"]]
    printed = [subprocess.run(argv, capture_output=True, text=True, cwd=tmp_path).stdout.strip() for argv in runs_it]
    assert printed == ["True", "True", "False"]
