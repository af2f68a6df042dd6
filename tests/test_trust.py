"""Nothing a user wrote is touched, and every fault is one line that leaves a resumable run (issue 34, 4 and 5)."""
import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from cifarjax import runs
from cifarjax.errors import UserError
from experiments import cnn
from tests.helpers import ROOT, cnn_args, fails, make_image_folder, start_module, tree_bytes


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished two-epoch run with a checkpoint per epoch (copied by the tests that change it)."""
    root = tmp_path_factory.mktemp("finished")
    data = make_image_folder(root / "data", n_train=20, n_test=6, learnable=True)
    cnn.main(cnn_args(data, root / "run", "--epochs", "2", "--checkpoint-seconds", "0"))
    return root / "run", data


def copy_run(finished, tmp_path):
    import shutil
    shutil.copytree(finished[0], tmp_path / "run")
    return tmp_path / "run"


# ------------------------------------------------------------------------------------------------ 4. user's files

def test_overwrite_removes_exactly_the_files_cifarjax_wrote(finished, tmp_path, capsys):
    """And evaluate and compare never write over a user's file: their plots go beside a user's pictures of the same
    names, and the one --overwrite at the end removes them with the rest of what cifarjax wrote (one test, so that
    one copied run serves both)."""
    from experiments import compare, evaluate
    out = copy_run(finished, tmp_path)
    manifest = set((out / runs.MANIFEST).read_text().split())
    steps = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert len(steps) == 2 and {f"checkpoints/{s}" for s in steps} <= manifest
    assert {"config.json", "metrics.jsonl", "summary.json", "plots/training_results.png"} <= manifest
    assert any(e.startswith("tensorboard/events.out.tfevents") for e in manifest)
    (out / "plots" / "my_figure.png").write_text("mine")  # a user's files inside cifarjax's own folders
    (out / "tensorboard" / "notes.txt").write_text("mine")
    (out / "checkpoints" / "README").write_text("mine")
    for name in ("confusion_matrix_test.png", "comparison.png"):  # named as evaluate's and compare's own plots
        (out / "plots" / name).write_bytes(b"my picture")
    evaluate.main([str(out)])
    captured = capsys.readouterr()
    assert (out / "plots" / "confusion_matrix_test.png").read_bytes() == b"my picture"
    assert f"{out / 'plots' / 'confusion_matrix_test.png'} is not a file cifarjax wrote" in captured.err
    assert f"confusion matrix: {out / 'plots' / 'confusion_matrix_test-2.png'}" in captured.out
    compare.main([str(out)])
    assert (out / "plots" / "comparison.png").read_bytes() == b"my picture"
    assert f"plot: {out / 'plots' / 'comparison-2.png'}" in capsys.readouterr().out
    manifest = runs.RunFolder(out).manifest()
    assert "plots/comparison-2.png" in manifest and "plots/confusion_matrix_test-2.png" in manifest
    assert "plots/comparison.png" not in manifest and "plots/confusion_matrix_test.png" not in manifest
    # One rule for the default plot and --out: an existing plot only with --overwrite, a user's file never.
    assert "comparison-2.png exists; pass --overwrite" in fails(compare.main, [str(out)], capsys)
    compare.main([str(out), "--overwrite"])
    assert "did not write; choose another --out" in fails(
        compare.main, [str(out), "--out", str(out / "plots" / "comparison.png"), "--overwrite"], capsys)
    capsys.readouterr()
    cnn.main(cnn_args(finished[1], out, "--overwrite"))  # removes what cifarjax wrote, and only that
    assert (out / "plots" / "my_figure.png").read_text() == "mine"
    assert (out / "tensorboard" / "notes.txt").read_text() == "mine"
    assert (out / "checkpoints" / "README").read_text() == "mine"
    assert (out / "plots" / "comparison.png").read_bytes() == b"my picture"
    assert (out / "plots" / "confusion_matrix_test.png").read_bytes() == b"my picture"
    assert not (out / "plots" / "comparison-2.png").exists()
    assert not (out / "plots" / "confusion_matrix_test-2.png").exists()
    assert ("kept checkpoints/README, plots/comparison.png, plots/confusion_matrix_test.png, plots/my_figure.png, "
            "tensorboard/notes.txt in") in capsys.readouterr().err
    assert json.loads((out / runs.CONFIG).read_text())["n_epochs"] == 1
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == sorted([str(min(map(int, steps))), "README"])
    assert len(list((out / "tensorboard").glob("events.out.tfevents.*"))) == 1


def test_a_manifest_never_reaches_outside_its_run(tmp_path):
    outside = tmp_path / "precious.txt"
    outside.write_text("mine")
    run = runs.RunFolder(tmp_path / "run", "cnn").create().path
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "x.png").write_text("mine")
    (run / "plots").rmdir()
    (run / "plots").symlink_to(tmp_path / "mine")  # a user's link where cifarjax's folder was
    (run / runs.MANIFEST).write_text(f"../precious.txt\n{outside}\nconfig.json\nplots/x.png\n")
    (run / runs.CONFIG).write_text("{}")
    runs.RunFolder(run).remove_own_files()
    assert outside.read_text() == "mine" and not (run / runs.CONFIG).exists()
    assert (tmp_path / "mine" / "x.png").read_text() == "mine"


def test_a_figure_path_is_checked_as_it_will_be_written(tmp_path):
    from cifarjax import plots
    (tmp_path / "fig.png").mkdir()
    with pytest.raises(UserError, match="it is a folder"):
        plots.plot_confusion_matrix(np.eye(2, dtype=int), ["a", "b"], tmp_path / "fig")  # matplotlib adds .png
    with pytest.raises(UserError, match=r"\.txt is not an image format"):
        plots.plot_confusion_matrix(np.eye(2, dtype=int), ["a", "b"], tmp_path / "out.txt")
    assert not (tmp_path / "out.txt").exists()


def test_overwrite_and_resume_refuse_a_linked_subfolder(finished, tmp_path, capsys):
    out = copy_run(finished, tmp_path)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "training_results.png").write_text("mine")
    import shutil
    shutil.rmtree(out / "plots")
    (out / "plots").symlink_to(tmp_path / "mine")  # cifarjax would write its plots into the user's folder
    for flag in ("--overwrite", "--resume"):
        assert "plots is a symbolic link" in fails(cnn.main, cnn_args(finished[1], out, flag), capsys)
    assert (tmp_path / "mine" / "training_results.png").read_text() == "mine"


def test_the_library_writes_only_into_a_folder_of_its_own(data_dir, tmp_path):
    from cifarjax.data import load_dataset, train_val_split
    from cifarjax.loop import train_loop
    from tests.test_train import fast
    data = load_dataset(data_dir)
    train, val = train_val_split(data)
    mine = tmp_path / "notes"
    mine.mkdir()
    (mine / "metrics.jsonl").write_text("my notes\n")
    with pytest.raises(UserError, match="notes holds files that cifarjax did not create .* pass a new or empty"):
        train_loop(fast(num_classes=len(data.classes)), train, val, run=mine)
    assert [p.name for p in mine.iterdir()] == ["metrics.jsonl"]
    assert (mine / "metrics.jsonl").read_text() == "my notes\n"


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_a_run_folder_in_use_cannot_be_overwritten_or_resumed(finished, tmp_path, capsys):
    out = copy_run(finished, tmp_path)
    assert not (out / runs.LOCK).exists()  # released when the command ended
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (out / runs.LOCK).write_text(json.dumps({"host": socket.gethostname(), "pid": live.pid}))
        before = tree_bytes(out)
        for extra in (["--overwrite"], ["--resume", "--epochs", "3"]):
            message = fails(cnn.main, cnn_args(finished[1], out, *extra), capsys)
            assert f"in use by process {live.pid} on this machine" in message and f"kill {live.pid}" in message
        assert tree_bytes(out) == before
    finally:
        live.kill()
        live.wait()
    (out / runs.LOCK).write_text(json.dumps({"host": "node-7", "pid": 1234}))
    before = tree_bytes(out)
    message = fails(cnn.main, cnn_args(finished[1], out, "--resume", "--epochs", "3"), capsys)
    assert "process 1234 on host node-7" in message and str(out / runs.LOCK) in message and "delete" in message
    assert tree_bytes(out) == before
    (out / runs.LOCK).write_text(json.dumps({"host": socket.gethostname(), "pid": dead_pid()}))  # stale
    cnn.main(["--resume", "--out", str(out), "--epochs", "3"])
    assert json.loads((out / runs.SUMMARY).read_text())["epochs"] == 3


# ------------------------------------------------------------------------------------------------ 5. faults

def test_metrics_reader_tolerates_a_cut_last_line(tmp_path, capsys):
    path = tmp_path / runs.METRICS
    path.write_text('{"step": 1, "epoch": 1}\n{"step": 2, "ep')
    assert runs.read_metrics(path) == [{"step": 1, "epoch": 1}] == runs.read_metrics(tmp_path)
    assert "incomplete" in capsys.readouterr().err
    path.write_text('{"step": 1\n{"step": 2}\n')
    with pytest.raises(UserError, match="line 1 of .*metrics.jsonl"):
        runs.read_metrics(path)
    assert runs.read_metrics(tmp_path / "none") == []


def test_a_second_ctrl_c_says_truthfully_what_is_saved(data_dir, tmp_path, capsys, monkeypatch):
    from cifarjax import loop
    evaluate = loop.Trainer.evaluate

    def interrupted_in_epoch_two(self, step):
        if step > self.steps_per_epoch:
            raise KeyboardInterrupt  # what a second Ctrl-C raises, at once
        return evaluate(self, step)
    monkeypatch.setattr(loop.Trainer, "evaluate", interrupted_in_epoch_two)
    out = tmp_path / "run"
    message = fails(cnn.main, cnn_args(data_dir, out, "--epochs", "2", "--checkpoint-seconds", "0"), capsys, code=130)
    assert "newest checkpoint (step 6, epoch 1)" in message and "--resume --out" in message
    assert "nothing to resume" not in message
    monkeypatch.setattr(loop.Trainer, "evaluate", evaluate)
    cnn.main(["--resume", "--out", str(out)])
    assert json.loads((out / runs.SUMMARY).read_text())["epochs"] == 2


def test_a_full_disk_during_a_checkpoint_is_one_line_and_leaves_no_temporary_folder(data_dir, tmp_path, capsys,
                                                                                   monkeypatch):
    import orbax.checkpoint as ocp
    save = ocp.CheckpointManager.save

    def full_at_the_second(self, step, *args, **kwargs):
        if step > 6:
            (self.directory / f"{step}.orbax-checkpoint-tmp-123").mkdir()
            raise ValueError("RESOURCE_EXHAUSTED: Error writing local file: No space left on device [OS error: 28]")
        return save(self, step, *args, **kwargs)
    monkeypatch.setattr(ocp.CheckpointManager, "save", full_at_the_second)
    out = tmp_path / "run"
    message = fails(cnn.main, cnn_args(data_dir, out, "--epochs", "2", "--checkpoint-seconds", "0"), capsys)
    assert "the disk is full" in message and str(out.resolve() / "checkpoints") in message and "--resume" in message
    assert not list((out / "checkpoints").glob("*tmp*"))
    monkeypatch.setattr(ocp.CheckpointManager, "save", save)
    cnn.main(["--resume", "--out", str(out)])  # the first epoch's checkpoint carries the run on
    assert json.loads((out / runs.SUMMARY).read_text())["epochs"] == 2


def test_orbax_failures_logged_by_its_threads_stay_out_of_the_output():
    """On a real full disk (a 400 KB tmpfs) orbax logged six tracebacks, 400 lines, from its background threads
    before the error reached the waiting thread and its one line: those records are dropped, others are not."""
    import logging
    from cifarjax.checkpoint import quiet_orbax
    quiet_orbax()  # as a command does at its start
    absl = logging.getLogger("absl")
    record = lambda path: logging.LogRecord("absl", logging.ERROR, path, 1, "failed", None, None)  # noqa: E731
    assert not absl.filter(record(os.path.join("site-packages", "orbax", "checkpoint", "future.py")))
    assert absl.filter(record(os.path.join("site-packages", "flax", "core.py")))
    # As the command ends, asyncio logs each task of the failed save (3 of 8 such runs did, before this filter).
    task = lambda where: logging.LogRecord("asyncio", logging.ERROR, "base_events.py", 1,  # noqa: E731
                                           f"Task exception was never retrieved\nfuture: <Task coro=<x() defined at "
                                           f"{os.path.join('site-packages', where, 'type_handlers.py')}>>", None, None)
    asyncio_log = logging.getLogger("asyncio")
    assert not asyncio_log.filter(task("orbax")) and asyncio_log.filter(task("mine"))


def test_a_damaged_checkpoint_prints_no_asyncio_traceback(finished, tmp_path, capfd):
    from cifarjax.checkpoint import load_variables
    out = copy_run(finished, tmp_path)
    for chunk in (out / "checkpoints").glob("*/variables/ocdbt.process_0/d/*"):
        chunk.write_bytes(b"damaged")
    with pytest.raises(UserError, match="no intact checkpoint"):
        load_variables(out)
    time.sleep(0.5)  # tensorstore's other reads complete after the failed restore
    assert "Event loop is closed" not in capfd.readouterr().err


def test_a_run_killed_before_its_summary_is_completed_by_resume(data_dir, tmp_path, capsys, monkeypatch):
    from cifarjax import plots

    def killed(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(plots, "plot_training_results", killed)
    out = tmp_path / "run"
    message = fails(cnn.main, cnn_args(data_dir, out), capsys, code=130)
    assert "checkpoint (step 6) is saved" in message and "--resume --out" in message
    assert not (out / runs.SUMMARY).exists()
    monkeypatch.undo()
    cnn.main(["--resume", "--out", str(out)])
    summary = json.loads((out / runs.SUMMARY).read_text())
    assert summary["epochs"] == 1 and (out / "plots" / "training_results.png").is_file()
    assert len(runs.read_metrics(out)) == 1


@pytest.mark.slow
def test_sigterm_stops_like_ctrl_c_and_says_so_at_once(tmp_path, data_dir):
    out = tmp_path / "run"
    child = start_module("experiments.cnn", *cnn_args(data_dir, out, "--epochs", "200", "--eval-every", "0"))
    deadline = time.time() + 240  # a hang guard, not a timing
    while time.time() < deadline and len(runs.read_metrics(out)) < 2:
        time.sleep(0.2)
    child.send_signal(signal.SIGTERM)
    _, err = child.communicate(timeout=120)
    assert child.returncode == 143, err[-2000:]
    assert "stopping after this step" in err and "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "terminated (SIGTERM) at step" in errors[0] and "--resume --out" in errors[0]
    assert not (out / runs.LOCK).exists()  # free to resume, as test_reliability's Ctrl-C test does after the same stop


# ------------------------------------------------------------------------------------------------ 6. refused starts

@pytest.mark.parametrize("args, message", [
    (["--seed", str(2**64)], "seed must be at most 4294967295"),
    (["--schedule", "cosine", "--warmup-epochs", "2", "--epochs", "2"],
     "--warmup-epochs 2 is not shorter than --epochs 2"),
    (["--schedule", "onecycle", "--warmup-epochs", "3", "--epochs", "1"], "--warmup-epochs 3 is not shorter"),
    (["--crop-padding", "17"], "crop-padding 17 is more than half the 32-pixel image"),
    (["--epochs", "1000000"], "epochs must be at most"),
    (["--eval-batch-size", str(2**40)], "eval-batch-size must be at most"),
])
def test_a_refused_start_leaves_nothing(data_dir, tmp_path, capsys, args, message):
    out = tmp_path / "run"
    assert message in fails(cnn.main, cnn_args(data_dir, out) + args, capsys)
    assert not out.exists()


def test_one_class_of_images_is_refused_before_the_run_starts(tmp_path, capsys):
    data = make_image_folder(tmp_path / "data", classes=("cat",), n_train=20, n_test=0)
    message = fails(cnn.main, cnn_args(data, tmp_path / "run"), capsys)
    assert "needs at least 2 classes, and the data has 1 (cat)" in message and not (tmp_path / "run").exists()


def test_a_recipes_warm_up_fits_a_short_run():
    from cifarjax.flags import new_config
    from cifarjax.optim import lr_at
    short = new_config("cnn", "improved", {"n_epochs": 3})
    assert short.warmup_epochs == pytest.approx(0.45)  # the recipe's 3 of 20 epochs, as a share of 3
    rates = [lr_at(short, 10, step) for step in range(30)]
    assert int(np.argmax(rates)) == 4 and rates[-1] < rates[4] / 100  # peaks at 15% of the run, then decays
    assert new_config("cnn", "improved", {"n_epochs": 3, "warmup_epochs": 1.0}).warmup_epochs == 1.0  # typed wins
    assert new_config("cnn", "improved", {}).warmup_epochs == 3.0


def test_resume_does_not_stretch_a_schedule_over_the_run():
    from cifarjax.config import Config
    from cifarjax.flags import resumed_config
    with pytest.raises(UserError, match=r"--epochs 5 on resume: .* onecycle .* its 3 epochs.*--epochs 3"):
        resumed_config(Config(schedule="onecycle", n_epochs=3), {"n_epochs": 5}, None, "RUN")
    assert resumed_config(Config(schedule="onecycle", n_epochs=3), {"n_epochs": 3}, None, "RUN").n_epochs == 3
    assert resumed_config(Config(n_epochs=3), {"n_epochs": 5}, None, "RUN").n_epochs == 5  # constant: no stretch


# ------------------------------------------------------------------------------------------------ 7. library inputs

def test_the_library_checks_its_inputs():
    from cifarjax.config import Config
    from cifarjax.data import Dataset, Split, train_val_split
    from cifarjax.predictor import predict, score
    from cifarjax.loop import train_loop
    from tests.test_train import fast, tiny_split
    images, labels = np.zeros((10, 32, 32, 3), np.uint8), np.zeros(10, np.int32)
    with pytest.raises(UserError, match="as many labels as images: got uint8 \\(10, 32, 32, 3\\) images and 12"):
        Split(images, np.zeros(12, np.int32))
    with pytest.raises(UserError, match="labels must be a 1-D integer array"):
        Split(images, np.zeros(10, np.float32))
    with pytest.raises(UserError, match=r"training images must be a uint8 array of shape \(N, height, width, 3\)"):
        train_loop(fast(n_epochs=1), Split(images.astype(np.float32), labels), tiny_split(12))
    with pytest.raises(UserError, match="images to predict must be a uint8 array .* got uint8 \\(10, 32, 32\\)"):
        predict(Config(), {}, Split(images[..., 0], labels))
    with pytest.raises(UserError, match="images to predict are empty"):
        predict(Config(), {}, Split(images[:0], labels[:0]))
    with pytest.raises(UserError, match="as many predictions as labels"):
        score(labels, labels[:5], ["a", "b"])
    with pytest.raises(UserError, match=r"label\(s\) outside \[0, 2\)"):
        score(labels + 2, labels, ["a", "b"])
    with pytest.raises(UserError, match="empty validation split"):
        train_val_split(Dataset("folder", ("a",), Split(images[:2], labels[:2]), None))
    dataset = Dataset("folder", ("a",), Split(images, labels), None)
    for changes, message in (({"subset": -3}, "subset must be an integer from 0"), ({"subset": "100"}, "got '100'"),
                             ({"seed": 2**64}, "seed must be an integer"), ({"val_fraction": "0.2"}, "a number")):
        with pytest.raises(UserError, match=message):
            train_val_split(dataset, **changes)
    from cifarjax.recipes import recipe_config
    with pytest.raises(UserError, match="recipes are for 'cnn' or 'finetune', got 'vgg'"):
        recipe_config("vgg")
    with pytest.raises(UserError, match="Config has no setting bogus"):
        recipe_config("cnn", bogus=1)


def test_a_data_dir_symlink_loop_is_reported_as_a_loop(tmp_path, capsys):
    (tmp_path / "data").symlink_to(tmp_path / "data")
    message = fails(cnn.main, ["--data-dir", str(tmp_path / "data"), "--out", str(tmp_path / "o")], capsys)
    assert "symbolic link loops" in message and "does not exist" not in message


def test_a_full_disk_while_appending_metrics_names_the_file_and_the_run_resumes(data_dir, tmp_path, capsys,
                                                                               monkeypatch):
    import errno
    append = runs.RunFolder.append_metrics

    def full_at_the_second(folder, record):
        if record["epoch"] > 1:
            with open(folder.path / runs.METRICS, "a") as f:
                f.write('{"step": ')  # what a full disk leaves: a cut line
            raise OSError(errno.ENOSPC, "No space left on device", str(folder.path / runs.METRICS))
        append(folder, record)
    monkeypatch.setattr(runs.RunFolder, "append_metrics", full_at_the_second)
    out = tmp_path / "run"
    message = fails(cnn.main, cnn_args(data_dir, out, "--epochs", "2", "--checkpoint-seconds", "0"), capsys)
    assert "No space left on device" in message and str(out / runs.METRICS) in message
    assert len(runs.read_metrics(out)) == 1
    monkeypatch.undo()
    cnn.main(["--resume", "--out", str(out)])
    assert [r["epoch"] for r in runs.read_metrics(out)] == [1, 2]


# ------------------------------------------------------------------------------------------------ 8. issue 43 (B)

@pytest.mark.parametrize("where", ["gc callback", "weakref callback"])
def test_a_ctrl_c_that_python_would_drop_still_ends_the_command(capsys, where):
    """JAX frees its buffers in a gc callback: a Ctrl-C handled there (or in a weakref callback, a finaliser) raised a
    KeyboardInterrupt that Python printed as "Exception ignored in" and dropped, and the run went on to its end
    with exit 0 (2 of 6 Ctrl-Cs a second into data loading)."""
    import gc
    import weakref
    from cifarjax.errors import exit_on_user_error

    def interrupt(*args):
        signal.raise_signal(signal.SIGINT)  # Python runs the handler here, inside the callback

    class Thing:
        pass

    @exit_on_user_error
    def main(argv):
        if where == "gc callback":
            gc.callbacks.append(interrupt)
            gc.collect()
            gc.callbacks.remove(interrupt)
        else:
            thing = Thing()
            ref = weakref.ref(thing, interrupt)  # noqa: F841 - its callback runs when `thing` goes
            del thing
        deadline = time.time() + 10  # a hang guard, not a timing
        while time.time() < deadline:
            time.sleep(0.001)
        raise AssertionError("the Ctrl-C was lost")

    # Python's own Ctrl-C handler, as in a terminal: a shell starts a background job (`cmd &`) with SIGINT ignored,
    # and a process started so inherits that (the whole suite failed here when CI was run that way).
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        message = fails(main, [], capsys, code=130)
    finally:
        signal.signal(signal.SIGINT, previous)
        if interrupt in gc.callbacks:
            gc.callbacks.remove(interrupt)
    assert "interrupted (Ctrl-C)" in message


def folder_of_length(root, length: int):
    """A new folder path of exactly `length` characters below `root` (folders of at most 200 characters each)."""
    path = str(root)
    while len(path) < length:
        path += "/" + "d" * min(200, length - len(path) - 1)
    assert len(path) == length
    return path


@pytest.mark.slow
@pytest.mark.parametrize("length", [4020, 4054])  # orbax fails in its background write / before it (then hung)
def test_a_checkpoint_that_cannot_be_written_ends_the_command_with_one_line(tmp_path, data_dir, length):
    """A path too long for the checkpoint's files (PATH_MAX is 4096): the folder and the run's other files fit.
    Orbax's threads of a save that failed before them waited five minutes for signals that never came."""
    out = folder_of_length(tmp_path, length - 4) + "/run"
    child = start_module("experiments.cnn", *cnn_args(data_dir, out))
    try:
        _, err = child.communicate(timeout=150)  # a hang guard, not a timing
    finally:
        child.kill()
    assert child.returncode == 2, err[-3000:]
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in err and "Exception" not in err, err[-3000:]
    assert errors[0].startswith(f"error: cannot write a checkpoint in {out}/checkpoints: the path is too long")
    assert errors[0].endswith("start the run again with a shorter --out")


def test_predict_skips_a_special_file_in_one_line(finished, tmp_path, capsys):
    """A FIFO named like an image blocked predict forever (and Ctrl-C with it); the data loader lists regular files
    only, and reading an image now opens nothing else."""
    import threading
    from PIL import Image
    from experiments import predict
    folder = tmp_path / "photos"
    folder.mkdir()
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(folder / "a.png")
    fifo = folder / "b.png"
    os.mkfifo(fifo)
    unblock = threading.Timer(60, lambda: os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)))  # a hang guard
    unblock.start()
    try:
        predict.main([str(finished[0]), str(folder), "--json"])
        captured = capsys.readouterr()
        assert captured.err.splitlines() == [f"warning: image {fifo} is not a regular file (a FIFO, a socket, a device "
                                             "or a folder); it is skipped"]
        result = json.loads(captured.out)
        assert [p["path"] for p in result["predictions"]] == [str(folder / "a.png")]
        assert result["unreadable"] == [str(fifo)]
        assert "none of the 1 image(s) could be read" in fails(predict.main, [str(finished[0]), str(fifo)], capsys)
    finally:
        unblock.cancel()


# evaluate and compare never write over a user's file: test_overwrite_removes_exactly_the_files_cifarjax_wrote,
# which shares its --overwrite run.


def test_evaluate_of_a_read_only_run_prints_its_score_and_a_flag_that_works(finished, tmp_path, capsys, monkeypatch):
    import contextlib
    import errno
    from cifarjax import plots
    from experiments import evaluate

    @contextlib.contextmanager
    def read_only(path, mode="w"):
        raise PermissionError(errno.EACCES, "Permission denied", str(path))
        yield
    out = copy_run(finished, tmp_path)
    monkeypatch.setattr(plots, "atomic_write", read_only)
    evaluate.main([str(out)])
    captured = capsys.readouterr()
    assert "accuracy" in captured.out and "confusion matrix: not written" in captured.out
    [warning] = [line for line in captured.err.splitlines() if line.startswith("warning:")]
    assert warning.startswith("warning: the confusion matrix was not written (Permission denied on ")
    assert warning.endswith("pass --plot FILE to write it elsewhere")
    monkeypatch.undo()
    evaluate.main([str(out), "--plot", str(tmp_path / "cm.png")])
    assert f"confusion matrix: {tmp_path / 'cm.png'}" in capsys.readouterr().out and (tmp_path / "cm.png").is_file()


def test_a_run_folder_inside_the_data_folder_is_refused(data_dir, tmp_path, capsys):
    """It became a split of the data (its folders read as classes), and every later run on that data failed."""
    before = tree_bytes(data_dir)
    for out in (data_dir / "run", data_dir / "train" / "runs" / "a"):
        message = fails(cnn.main, cnn_args(data_dir, out), capsys)
        assert f"--out {out} lies inside the data folder {data_dir}" in message and "outside it" in message
    assert tree_bytes(data_dir) == before and sorted(p.name for p in data_dir.iterdir()) == ["test", "train"]
    from cifarjax.study import study
    with pytest.raises(UserError, match="lies inside the data folder"):
        study(str(data_dir), "random", out=data_dir / "study")


def test_a_ctrl_c_before_the_first_checkpoint_gives_a_command_that_works(data_dir, tmp_path, capsys, monkeypatch):
    """It said "nothing to resume, start again", and the same command was then refused: the folder holds a run.
    Inside the training loop before its first checkpoint, and outside it once the run folder is made (where the
    fine-tune extracts its features: `common.open_run` sets the advice for every command)."""
    import shlex
    from cifarjax import loop

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    out = tmp_path / "run"
    for where in (loop.Trainer, "start"), (cnn, "train_loop"):
        monkeypatch.setattr(*where, interrupted)
        message = fails(cnn.main, cnn_args(data_dir, out, *(["--overwrite"] if out.exists() else [])), capsys,
                        code=130)
        command = f"python -m experiments.cnn --resume --out {shlex.quote(str(out))}"
        assert command in message and "nothing to resume" not in message, message
        monkeypatch.undo()
    cnn.main(["--resume", "--out", str(out)])
    assert json.loads((out / runs.SUMMARY).read_text())["epochs"] == 1


def test_a_non_finite_loss_before_any_checkpoint_gives_a_command_that_works(data_dir, tmp_path, capsys):
    """It said "start again with a lower learning rate", and the same --out was then refused."""
    import shlex
    out = tmp_path / "run"
    message = fails(cnn.main, cnn_args(data_dir, out, "--lr", "1e30"), capsys)
    assert "training loss became nan at step" in message and "no checkpoint was written yet" in message
    command = shlex.split(message.split("replacing this run: ")[1])
    assert command[:3] == ["python", "-m", "experiments.cnn"] and command[-5:] == [
        "--overwrite", "--out", str(out), "--lr", "1e+29"]
    cnn.main(command[3:-1] + ["1e-3"])  # the advice, with a sane rate
    summary = json.loads((out / runs.SUMMARY).read_text())
    assert np.isfinite(summary["train_loss"]) and json.loads((out / runs.CONFIG).read_text())["lr"] == 1e-3


def test_an_interrupted_study_names_the_command_that_resumes_it(tmp_path, capsys, monkeypatch):
    """It named the checkpoint of a cell that had finished, and no command; a cell's own errors said --resume."""
    import shlex
    from cifarjax import study
    from cifarjax.errors import exit_on_user_error, set_interrupt_advice
    from tests.test_train import fast, tiny_split
    hints = []

    def interrupted(*args, resume_hint, **kwargs):
        hints.append(resume_hint)
        raise KeyboardInterrupt
    monkeypatch.setattr(study, "train_loop", interrupted)
    monkeypatch.setattr(study.Study, "variables", lambda *args: {})
    out = tmp_path / "my study"
    the_study = study.Study(out, None, tiny_split(40), tiny_split(12, seed=1), fast(n_epochs=1), None)

    @exit_on_user_error
    def main(argv):
        set_interrupt_advice("its newest checkpoint (step 6) is saved: resume with --resume")  # a finished cell's
        the_study.run_cell(study.REFERENCE)
    message = fails(main, [], capsys, code=130)
    command = f"python -m experiments.study --resume --out {shlex.quote(str(out))}"
    assert message.endswith(f"finished cells are kept: resume it with {command}") and "step 6" not in message
    assert hints == [command]


# ------------------------------------------------------------------------------------------------ issue 43, part A

@pytest.mark.parametrize("changes, message", [
    ({"n_epochs": 2.5}, r"n_epochs \(--epochs\) must be an integer, got 2.5"),
    ({"lr": "0.01"}, "lr must be a number, got '0.01'"),
    ({"batch_size": "64"}, "batch_size must be an integer, got '64'"),
    ({"img_size": 32.5}, "must be an integer, got 32.5"),
    ({"seed": True}, "seed must be an integer, got True"),
    ({"eval_every": 3.5}, "must be an integer, got 3.5"),  # would never evaluate mid-epoch
    ({"flip": "no"}, "flip must be true or false"),
    ({"data_dir": 3}, "must be a string, got 3"),
])
def test_config_validate_refuses_wrong_types_naming_the_field(changes, message):
    from cifarjax.config import Config
    with pytest.raises(UserError, match=message):
        Config(**changes).validate()


def test_the_public_api_refuses_inputs_it_would_misread(tmp_path):
    from cifarjax.config import Config
    from cifarjax.predictor import probabilities
    from cifarjax.plots import plot_confusion_matrix
    from cifarjax.predictor import Run
    images = np.zeros((2, 32, 32, 3), np.float32)
    for wrong, message in ((images + 255, r"float32 values in \[255, 255\]"), (list(images), "got a list"),
                           (np.zeros((2, 32, 32, 4), np.uint8), r"got uint8 \(2, 32, 32, 4\)"),
                           (np.zeros((2, 32, 32, 3), np.int64), "got int64")):
        with pytest.raises(UserError, match="probabilities' images must be an \\(N, height, width, 3\\) array .*"
                                            + message):
            probabilities(Config(), {}, wrong)
    run = Run(tmp_path, Config(classes=("a", "b", "c"), num_classes=3), {}, False)
    assert run.top(np.array([0.2, 0.5, 0.3]), 2) == [("b", 0.5), ("c", 0.3)]
    for k in (0, -1, 1.5, True):
        with pytest.raises(UserError, match="top's k is how many classes to list: a positive integer"):
            run.top(np.array([0.2, 0.5, 0.3]), k)
    assert plot_confusion_matrix(np.eye(3) * 2.5, ("a", "b", "c"), tmp_path / "float.png").stat().st_size > 1000
    for wrong in (np.eye(2), -np.eye(3), np.full((3, 3), np.nan), np.array([["a"] * 3] * 3)):
        with pytest.raises(UserError, match=r"plot_confusion_matrix takes a \(3, 3\) matrix of non-negative counts"):
            plot_confusion_matrix(wrong, ("a", "b", "c"), tmp_path / "wrong.png")


@pytest.mark.parametrize("edit, message", [
    (lambda c: {**c, "lr": "0.001"}, "config.json: lr must be a number, got '0.001'; correct it"),
    (lambda c: [c], "config.json holds a JSON list, not an object of settings"),
    (lambda c: {**c, "n_epochs": "2"}, r"config.json: n_epochs \(--epochs\) must be an integer, got '2'"),
    (lambda c: {**c, "batch_size": [8]}, r"config.json: batch_size must be an integer, got \[8\]"),
    (lambda c: {**c, "data_fingerprint": "abc"}, "config.json: data_fingerprint must be an object with sha256"),
])
def test_a_hand_edited_config_json_is_one_line_naming_the_field(finished, tmp_path, capsys, edit, message):
    """Valid JSON with wrong types ended in TypeErrors from optax, batching and the config: resume, evaluate,
    predict and load_run read it back type-checked."""
    import re

    from cifarjax import load_run
    from experiments import evaluate, predict
    out = copy_run(finished, tmp_path)
    config = json.loads((out / runs.CONFIG).read_text())
    (out / runs.CONFIG).write_text(json.dumps(edit(config)))
    image = sorted((finished[1] / "test").rglob("*.png"))[0]
    for main, args in ((cnn.main, cnn_args(finished[1], out, "--resume", "--epochs", "3")),
                       (evaluate.main, [str(out)]), (predict.main, [str(out), str(image)])):
        with pytest.raises(SystemExit) as exit_info:
            main(args)
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and re.search(message, err) and len(err.strip().splitlines()) == 1, err
    with pytest.raises(UserError, match=message):
        load_run(out)


def test_resuming_a_finished_run_keeps_its_training_rate(finished, tmp_path, capsys):
    """summary.json said 0 images/s after a --resume with nothing left to train: it keeps the earlier rate."""
    out = copy_run(finished, tmp_path)
    before = json.loads((out / runs.SUMMARY).read_text())
    cnn.main(cnn_args(finished[1], out, "--resume", "--epochs", "2"))
    after = json.loads((out / runs.SUMMARY).read_text())
    assert "this process trained nothing" in capsys.readouterr().out
    assert after["this_process"]["images_trained"] == 0 and after["sessions"] == 2
    assert after["images_per_second"] == before["images_per_second"] > 0
    (out / runs.SUMMARY).unlink()  # killed before its summary: nothing measured, and it says so
    cnn.main(cnn_args(finished[1], out, "--resume", "--epochs", "2"))
    assert json.loads((out / runs.SUMMARY).read_text())["images_per_second"] is None


def test_a_class_folder_named_in_bytes_that_are_not_utf8_is_shown_escaped_everywhere(data_dir, tmp_path, capsys):
    """os.listdir gives such a name as surrogate escapes: plotting raised three tracebacks and no summary.json
    was written. The class is 'caf\\xe9' in plots, tables and JSON, and training, evaluate, predict and resume
    work."""
    from experiments import evaluate, predict
    bad = os.fsdecode(b"caf\xe9")
    for split in ("train", "test"):
        os.rename(data_dir / split / "cat", data_dir / split / bad)
    out = tmp_path / "run"
    cnn.main(cnn_args(data_dir, out))
    assert json.loads((out / runs.CONFIG).read_text())["classes"] == ["caf\\xe9", "dog", "frog"]
    assert (out / runs.SUMMARY).is_file() and (out / "plots" / "confusion_matrix.png").is_file()
    capsys.readouterr()
    evaluate.main([str(out), "--json"])
    assert set(json.loads(capsys.readouterr().out)["per_class"]) == {"caf\\xe9", "dog", "frog"}
    predict.main([str(out), str(data_dir / "test" / bad), "--json", "--top", "1"])
    printed = capsys.readouterr().out
    printed.encode("utf-8")  # no surrogates left: it prints to any terminal
    assert "caf\\\\xe9/0000.png" in printed  # the file's path, escaped (in JSON, the backslash doubled)
    cnn.main(cnn_args(data_dir, out, "--resume", "--epochs", "2"))
    assert json.loads((out / runs.SUMMARY).read_text())["epochs"] == 2
    from cifarjax import plots  # a library caller's names reach the figures as they are, and are escaped there
    assert plots.plot_runs({bad: {"val": [0.1, 0.2]}}, tmp_path / "runs.png", bad).is_file()
    assert plots.plot_confusion_matrix(np.eye(2, dtype=int), [bad, "b"], tmp_path / "matrix.png").is_file()


def test_commands_run_from_a_folder_holding_another_cifarjax_folder(tmp_path):
    """From the clone's parent, the clone's folder `cifarjax/` was imported as a namespace package ahead of an
    editable install's import hook (which Python consults after the working directory): `cifarjax.__version__`
    failed and left an unmarked plots/. The hook is simulated as setuptools writes it; importing `experiments`
    (what `python -m experiments.NAME` does first) must give the real package."""
    (tmp_path / "cifarjax" / "cifarjax").mkdir(parents=True)  # a clone named cifarjax, seen from its parent
    hook = f"""
import importlib.util, sys
class EditableFinder:
    @classmethod
    def find_spec(cls, name, path=None, target=None):
        if name in ("cifarjax", "experiments"):
            return importlib.util.spec_from_file_location(name, "{ROOT}/" + name + "/__init__.py",
                                                          submodule_search_locations=["{ROOT}/" + name])
sys.meta_path.append(EditableFinder)
sys.path.insert(0, "")
"""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    run = lambda code: subprocess.run([sys.executable, "-S", "-c", hook + code], cwd=tmp_path, env=env,  # noqa: E731
                                      capture_output=True, text=True)
    assert "has no attribute '__version__'" in run("import cifarjax; cifarjax.__version__").stderr  # the fault
    result = run("import experiments, cifarjax; print(cifarjax.__version__, cifarjax.__file__)")
    assert result.stdout.split() == [__import__("cifarjax").__version__, f"{ROOT}/cifarjax/__init__.py"], result.stderr


def test_a_run_folder_is_marked_before_anything_is_made_in_it(tmp_path, monkeypatch):
    import types
    monkeypatch.setattr(runs, "cifarjax", types.ModuleType("cifarjax"))  # a namespace package has no __version__
    with pytest.raises(AttributeError):
        runs.RunFolder(tmp_path / "run", "cnn").create()
    assert not (tmp_path / "run").exists()  # no unmarked plots/ that the correct rerun would refuse


def test_no_module_of_the_package_shadows_the_standard_library():
    """With cifarjax/ as the working directory, cifarjax/platform.py was Python's own `platform` to every import."""
    names = {p.stem for folder in ("cifarjax", "cifarjax/cpu", "experiments") for p in (ROOT / folder).iterdir()
             if p.suffix == ".py" or (p / "__init__.py").is_file()}
    assert "target" in names and not names & set(sys.stdlib_module_names)


def test_an_image_over_pillows_pixel_limit_is_refused_in_one_line_as_a_corrupt_one_is(tmp_path, capfd, monkeypatch):
    """A 100-megapixel PNG printed Pillow's two-line DecompressionBombWarning (the limit is lowered here, so that a
    small image stands in for it)."""
    from PIL import Image

    from cifarjax.data import load_dataset
    from cifarjax.sources import decode_files
    data = make_image_folder(tmp_path / "data", n_train=2, n_test=0, size=48)  # 2,304 pixels
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 2000)  # warned of from 2,000, an error from 4,000
    with pytest.raises(UserError, match=r"cannot read image .*0000.png \(DecompressionBombWarning: Image size "
                                        r"\(2304 pixels\) exceeds limit of 2000 pixels.*\); delete or replace"):
        load_dataset(data)
    images, read = decode_files([data / "train" / "cat" / "0000.png"], 32, skip_unreadable=True)
    assert read == [] and len(images) == 0
    line, = capfd.readouterr().err.strip().splitlines()
    assert line.startswith("warning: cannot read image") and line.endswith("it is skipped")
