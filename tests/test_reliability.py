"""A careless or hostile user: nothing they have is lost, every failure is one clear line, advice works."""
import errno
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from cifarjax import runs
from cifarjax.errors import UserError
from experiments import cnn, finetune
from tests.helpers import ROOT, cnn_args, fails, make_image_folder, tree_bytes


def fake_run(folder, experiment="cnn"):
    """A marked run folder with cifarjax's files and a user's note."""
    runs.RunFolder(folder, experiment).create()
    (folder / runs.CONFIG).write_text("{}")
    (folder / runs.METRICS).write_text('{"step": 1}\n')
    return folder


# ------------------------------------------------------------------------------------------------ run folders

def test_overwrite_refuses_a_folder_cifarjax_did_not_make(data_dir, capsys):
    (data_dir / "notes.txt").write_text("my notes")
    before = tree_bytes(data_dir)
    message = fails(cnn.main, cnn_args(data_dir, data_dir, "--overwrite"), capsys)
    assert "did not create" in message and "choose another --out" in message
    assert tree_bytes(data_dir) == before


def test_overwrite_refuses_a_parent_of_runs(tmp_path, data_dir, capsys):
    parent = tmp_path / "experiments"
    fake_run(parent / "a"), fake_run(parent / "b")
    before = tree_bytes(parent)
    fails(cnn.main, cnn_args(data_dir, parent, "--overwrite"), capsys)
    assert tree_bytes(parent) == before


@pytest.mark.parametrize("bad", ["weights", "batch"])
def test_failed_start_leaves_the_old_run_intact_and_no_half_made_folder(tmp_path, data_dir, capsys, bad):
    old = fake_run(tmp_path / "old", "finetune")
    before = tree_bytes(old)
    junk = tmp_path / "junk.pth"
    junk.write_text("junk")
    args = ["--data-dir", str(data_dir), "--epochs", "1", "--batch-size", "7" if bad == "batch" else "8",
            "--weights", str(junk) if bad == "weights" else "random", "--conv-impl", "xla"]
    fails(finetune.main, args + ["--out", str(old), "--overwrite"], capsys)
    assert tree_bytes(old) == before
    fails(finetune.main, args + ["--out", str(tmp_path / "new")], capsys)
    assert not (tmp_path / "new").exists()


def test_overwrite_replaces_only_what_cifarjax_wrote(tmp_path, data_dir, capsys):
    out = fake_run(tmp_path / "run")
    (out / "notes.txt").write_text("keep me")
    cnn.main(cnn_args(data_dir, out, "--overwrite"))
    assert (out / "notes.txt").read_text() == "keep me"
    assert "kept notes.txt" in capsys.readouterr().err
    assert json.loads((out / runs.CONFIG).read_text())["n_epochs"] == 1
    assert len((out / runs.METRICS).read_text().splitlines()) == 1 and (out / "checkpoints").is_dir()


def test_out_below_a_file_and_resume_of_a_foreign_folder(tmp_path, data_dir, capsys):
    (tmp_path / "file").write_text("x")
    assert "lies below the file" in fails(cnn.main, cnn_args(data_dir, tmp_path / "file" / "run"), capsys)
    assert "not a cifarjax run folder" in fails(cnn.main, cnn_args(data_dir, data_dir, "--resume"), capsys)


# ------------------------------------------------------------------------------------------------ resume advice

def test_non_finite_loss_advice_works_when_followed_and_resume_takes_every_setting_from_the_run(tmp_path, data_dir,
                                                                                               capsys):
    """The advice after a non-finite loss works when followed, and a resume takes every setting it is not given
    from the run: one run and its resumes for both, where two tests made two runs (and compiled the same three
    programs: each distinct learning rate or augmentation compiles its own)."""
    out = tmp_path / "run"
    cnn.main(cnn_args(data_dir, out, "--crop-padding", "2", "--seed", "3"))
    message = fails(cnn.main, ["--resume", "--out", str(out), "--epochs", "3", "--lr", "1e30"], capsys)
    assert "training loss became nan at step" in message and "--resume --out" in message and "--lr 1e+29" in message
    assert "lr: " not in message
    cnn.main(["--resume", "--out", str(out), "--epochs", "2", "--lr", "1e-4"])  # the advice, with a sane rate
    summary = json.loads((out / runs.SUMMARY).read_text())
    assert summary["epochs"] == 2 and np.isfinite(summary["train_loss"])
    config = json.loads((out / runs.CONFIG).read_text())
    assert config["lr"] == 1e-4
    assert (config["crop_padding"], config["seed"], config["n_epochs"], config["data_dir"]) == (2, 3, 2, str(data_dir))
    message = fails(cnn.main, ["--resume", "--out", str(out), "--seed", "4"], capsys)
    assert "seed: 3 → 4" in message and "--lr" in message


def test_non_finite_inputs_are_not_blamed_on_the_learning_rate():
    from cifarjax.loop import NonFiniteLossError, train_loop
    from cifarjax.models import build_model, init_variables
    from tests.test_train import tiny_split
    from tests.test_train import fast
    config = fast(n_epochs=1)
    variables = init_variables(build_model(config), config)
    variables["params"]["fc2"]["bias"] = np.full_like(variables["params"]["fc2"]["bias"], np.nan)
    with pytest.raises(NonFiniteLossError, match="very first step.*not the cause"):
        train_loop(config, tiny_split(40), tiny_split(12, seed=1), variables)


def test_resume_with_fewer_epochs_is_refused(tmp_path, data_dir, capsys):
    out = tmp_path / "run"
    cnn.main(cnn_args(data_dir, out, "--epochs", "2"))
    before = tree_bytes(out)
    message = fails(cnn.main, ["--resume", "--out", str(out), "--epochs", "1"], capsys)
    assert "already trained 2 epochs" in message and "--epochs 2 or more" in message
    assert tree_bytes(out) == before


# ------------------------------------------------------------------------------------------------ one line each

def test_symlink_loop_and_unreadable_folders_are_one_line(tmp_path, capsys, monkeypatch):
    loop = tmp_path / "loop"
    loop.mkdir()
    (loop / "train").symlink_to(loop / "train")
    message = fails(cnn.main, ["--data-dir", str(loop), "--out", str(tmp_path / "o")], capsys)
    assert "symbolic link loops" in message or "no images" in message
    make_image_folder(tmp_path / "locked", n_train=2, n_test=0)
    real_scandir = os.scandir

    def refuse(path):
        if "locked" in str(path):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_scandir(path)
    monkeypatch.setattr(os, "scandir", refuse)
    message = fails(cnn.main, ["--data-dir", str(tmp_path / "locked"), "--out", str(tmp_path / "o")], capsys)
    assert "Permission denied" in message and "locked" in message


def test_full_disk_under_out_names_the_path(tmp_path, data_dir, capsys, monkeypatch):
    def full(path, *a, **k):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))
    monkeypatch.setattr(runs, "write_text", full)
    message = fails(cnn.main, cnn_args(data_dir, tmp_path / "run"), capsys)
    assert "No space left on device" in message and str(tmp_path / "run") in message and "disk is full" in message


def test_empty_data_path_and_a_folder_as_weights_are_named(tmp_path, data_dir, capsys):
    message = fails(cnn.main, ["--data-dir", "", "--out", str(tmp_path / "o")], capsys)
    assert "--data-dir is empty" in message  # not silently the current folder
    (tmp_path / "w.pth").mkdir()
    message = fails(finetune.main, ["--data-dir", str(data_dir), "--weights", str(tmp_path / "w.pth"),
                                    "--batch-size", "8", "--out", str(tmp_path / "o")], capsys)
    assert "is a folder" in message


def test_a_subset_larger_than_the_data_says_so(data_dir, capsys):
    from cifarjax.data import load_dataset, train_val_split
    train, _ = train_val_split(load_dataset(str(data_dir)), subset=10_000)
    assert len(train) == len(train_val_split(load_dataset(str(data_dir)))[0])
    assert "all of them are used" in capsys.readouterr().err


def test_malicious_pickle_message_gives_no_unsafe_advice(tmp_path, data_dir, capsys):
    import torch

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))
    path = tmp_path / "evil.pth"
    torch.save({"fc.weight": Evil()}, path)
    message = fails(finetune.main, ["--data-dir", str(data_dir), "--weights", str(path), "--batch-size", "8",
                                    "--out", str(tmp_path / "o")], capsys)
    assert "pickled code" in message and "weights_only" not in message


@pytest.mark.slow
def test_ctrl_c_stops_cleanly_and_the_run_resumes(tmp_path, data_dir):
    out = tmp_path / "run"
    env = dict(os.environ, NO_ALBUMENTATIONS_UPDATE="1", PYTHONPATH=ROOT)
    child = subprocess.Popen([sys.executable, "-m", "experiments.cnn", *cnn_args(data_dir, out, "--epochs", "200",
                                                                                   "--eval-every", "0")],
                             cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while time.time() < deadline and not (out / runs.METRICS).is_file():
        time.sleep(0.5)
    while time.time() < deadline and len((out / runs.METRICS).read_text().splitlines()) < 2:
        time.sleep(0.2)
    child.send_signal(signal.SIGINT)
    _, err = child.communicate(timeout=120)
    assert child.returncode == 130, err[-2000:]
    errors = [line for line in err.splitlines() if line.startswith("error:")]  # on a line of its own, not the bar's
    assert len(errors) == 1 and "interrupted at step" in errors[0] and "--resume --out" in errors[0], err[-2000:]
    assert "Traceback" not in err
    done = json.loads((out / runs.METRICS).read_text().splitlines()[-1])["epoch"]
    cnn.main(["--resume", "--out", str(out), "--epochs", str(int(done) + 1)])  # the signal needed a process
    assert json.loads((out / runs.SUMMARY).read_text())["epochs"] == int(done) + 1


def test_one_line_for_a_user_error_from_the_library():
    with pytest.raises(UserError, match="--overwrite and --resume contradict"):
        runs.RunFolder.check("x", "cnn", overwrite=True, resume=True)
