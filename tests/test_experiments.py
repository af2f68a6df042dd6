import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from PIL import Image

from experiments import cnn, compare, evaluate, finetune, predict
from cifarjax import runs
from cifarjax.checkpoint import load_variables
from cifarjax.pretrained import resnet18_from_torchvision
from tests.helpers import ROOT, cnn_args, fails, make_image_folder, randomized_torchvision_resnet18


def assert_png(path):
    assert path.is_file(), path
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size[0] > 200


def peak_resident_mb() -> float:
    """This process's peak resident memory so far, in MB, as Linux counts it (VmHWM)."""
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) / 1024 for line in status if line.startswith("VmHWM:"))


def test_cnn_writes_every_output(data_dir, tmp_path, capsys):
    """The command as a user runs it: the CPU's own convolutions (the default), every output file."""
    out = tmp_path / "run"
    peak_before = peak_resident_mb()
    cnn.main(["--data-dir", str(data_dir), "--epochs", "2", "--batch-size", "8", "--eval-every", "3",
              "--out", str(out)])
    peak_after = peak_resident_mb()
    assert "validation accuracy" in capsys.readouterr().out
    config = json.loads((out / "config.json").read_text())
    assert config["n_epochs"] == 2 and config["classes"] == ["cat", "dog", "frog"]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert {"step", "epoch", "train_loss", "train_accuracy", "val_accuracy", "wall_seconds"} <= set(records[0])
    assert records[-1]["epoch"] == 2.0
    summary = json.loads((out / "summary.json").read_text())
    for key in ("train_accuracy", "val_accuracy", "test_accuracy", "wall_seconds", "images_per_second",
                "device_kind", "device_count", "jax", "cifarjax"):
        assert key in summary, key
    assert peak_before - 0.05 <= summary["peak_rss_mb"] <= peak_after + 0.05  # this process's peak, in MB (rounded)
    for name in ("training_results", "confusion_matrix", "sample_predictions"):
        assert_png(out / "plots" / f"{name}.png")
    assert load_variables(out)["params"]["conv1"]["kernel"].shape == (3, 3, 3, 128)

    result = evaluate_json(out, capsys)
    assert result["n"] == 18 and set(result["per_class"]) == {"cat", "dog", "frog"}
    assert abs(result["accuracy"] - summary["test_accuracy"]) <= 5e-6  # evaluate --json rounds to 5 decimals
    assert_png(out / "plots" / "confusion_matrix_test.png")


def evaluate_json(run, capsys, *extra):
    evaluate.main([str(run), "--json", *extra])
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def one_epoch_run(tmp_path_factory):
    """A finished one-epoch run on data_dir's images, for the tests that do not change it."""
    root = tmp_path_factory.mktemp("one_epoch")
    data = make_image_folder(root / "data", n_train=20, n_test=6, learnable=True)
    cnn.main(cnn_args(data, root / "run"))
    return root / "run", data


def test_evaluate_needs_only_a_test_folder(one_epoch_run, tmp_path, capsys):
    out = one_epoch_run[0]
    capsys.readouterr()
    test_only = make_image_folder(tmp_path / "held_out", n_train=0, n_test=5, learnable=True, seed=7)
    result = evaluate_json(out, capsys, "--data-dir", str(test_only))
    assert result["n"] == 15 and result["split"] == "test"
    val = evaluate_json(out, capsys, "--split", "val")
    assert val["n"] == 12


def save_random_resnet(path):
    import torch
    torch.save(randomized_torchvision_resnet18(seed=3).state_dict(), path)
    return path


def test_features_are_cached_only_where_the_backbone_is_a_fixed_function():
    """The frozen-bn recipe caches its backbone's features; what trains a part of the backbone or its BatchNorm
    (the original), or augments beyond flips, does not."""
    from cifarjax.inputs import cacheable
    from cifarjax.recipes import recipe_config
    assert cacheable(recipe_config("finetune", "frozen-bn")) and not cacheable(recipe_config("finetune"))
    for changes in ({"unfreeze": "layer4"}, {"unfreeze": "all"}, {"crop_padding": 2}, {"cutout": 8},
                    {"augment_backend": "albumentations"}, {"cache_features": False}):
        assert not cacheable(recipe_config("finetune", "frozen-bn", **changes)), changes


def test_a_longer_finetune_continues_the_shorter_one_bit_for_bit(tmp_path, capsys):
    """`--epochs 1 2` gives each length its run folder, one plot overlays their curves, and the 2-epoch run
    continues the 1-epoch one: the same as a 2-epoch run alone. The original recipe (the default): the backbone's
    parameters stay the weights file's bit for bit, its BatchNorm statistics update as model.train() does, and its
    features are not cached."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    # Half data_dir's images (24 training, 6 validation, 6 test): 3 steps an epoch, each of ResNet-18's slow steps
    # on a CPU, still more than one per epoch; none of these properties depends on the number of images.
    data_dir = make_image_folder(tmp_path / "data", n_train=10, n_test=2, learnable=True)
    weights = save_random_resnet(tmp_path / "resnet18.pth")
    args = ["--data-dir", str(data_dir), "--batch-size", "8", "--weights", str(weights), "--conv-impl", "xla",
            "--checkpoint-seconds", "0"]  # every epoch end, so that the checkpoints kept can be compared too
    finetune.main(args + ["--epochs", "1", "2", "--out", str(tmp_path / "both")])
    assert "2 epochs: validation accuracy" in capsys.readouterr().out
    assert_png(tmp_path / "both" / "plots" / "fine_tuning_results.png")
    assert [r["epochs"] for r in json.loads((tmp_path / "both" / "summary.json").read_text())["runs"]] == [1, 2]
    shorter = tmp_path / "both" / "epochs-1"
    assert (shorter / "checkpoints").is_dir() and (shorter / runs.METRICS).is_file()
    finetune.main(args + ["--epochs", "2", "--out", str(tmp_path / "alone")])
    continued, alone = tmp_path / "both" / "epochs-2", tmp_path / "alone"

    port, trained = resnet18_from_torchvision(weights, num_classes=3), load_variables(alone)
    for a, b in zip(jax.tree.leaves(port["params"]["backbone"]), jax.tree.leaves(trained["params"]["backbone"])):
        np.testing.assert_array_equal(a, b)
    assert not any(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(port["batch_stats"]),
                                                        jax.tree.leaves(trained["batch_stats"])))
    assert not np.array_equal(port["params"]["head"]["kernel"], trained["params"]["head"]["kernel"])
    config, summary = (json.loads((alone / name).read_text()) for name in ("config.json", "summary.json"))
    assert (config["unfreeze"], config["bn"], config["recipe"]) == ("head", "train", "original")
    assert not summary["cached_features"] and "not torchvision's published ImageNet weights" in summary["weights"]

    def records(run):
        return [{k: v for k, v in r.items() if k != "wall_seconds"} for r in runs.read_metrics(run)]
    assert len(records(alone)) == 2 and records(continued) == records(alone)
    for a, b in zip(jax.tree.leaves(load_variables(alone)), jax.tree.leaves(load_variables(continued))):
        np.testing.assert_array_equal(a, b)
    assert sorted(p.name for p in (continued / "checkpoints").iterdir()) == \
        sorted(p.name for p in (alone / "checkpoints").iterdir())
    assert json.loads((continued / "summary.json").read_text())["continues"] == "epochs-1"
    events = EventAccumulator(str(continued / runs.TENSORBOARD))
    events.Reload()
    values = events.Tensors("val/accuracy") if "val/accuracy" in events.Tags()["tensors"] else \
        events.Scalars("val/accuracy")
    assert [v.step for v in values] == [r["step"] for r in records(alone)]


def test_a_longer_finetune_continues_a_shorter_one_only_where_the_rate_ignores_the_length():
    """Under a schedule over the run (cosine, one-cycle) a length's first epochs are not the shorter run's: each
    length trains from the start."""
    from cifarjax.config import Config
    folders = {1: Path("epochs-1"), 2: Path("epochs-2")}
    assert finetune.shorter_run(Config(), folders, 3) == Path("epochs-2")
    assert finetune.shorter_run(Config(), folders, 1) is None
    for schedule in ("cosine", "onecycle"):
        assert finetune.shorter_run(Config(schedule=schedule), folders, 3) is None


COMMANDS = {"cnn": cnn, "finetune": finetune, "evaluate": evaluate, "compare": compare, "predict": predict}


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        COMMANDS[command].main(["--help"])
    out = capsys.readouterr().out
    assert exit_info.value.code == 0 and "usage:" in out
    assert "(default: (default" not in out and out.count("(default:") == out.count("(default")


@pytest.mark.parametrize("command,args,message", [
    ("cnn", ["--batch-size", "0"], "must be at least 1"),
    ("cnn", ["--lr", "abc"], "is not a number"),
    ("cnn", ["--lr", "inf"], "lr must be a finite number"),
    ("cnn", ["--seed", "-1"], "seed must be at least 0"),
    ("finetune", ["--unfreeze", "everything"], "invalid choice"),
    ("cnn", ["--data-dir", "/no/such/folder"], "data folder /no/such/folder does not exist"),
    ("cnn", ["--img-size", "16"], "SimpleCNN needs img_size >= 30"),
    ("evaluate", ["/no/such/run"], "run folder /no/such/run does not exist"),
])
def test_bad_input_is_one_clear_message(command, args, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        COMMANDS[command].main([*args, *(["--out", str(tmp_path / "o")] if command != "evaluate" else [])])
    err = capsys.readouterr().err
    loading = sum(line.startswith("loading") for line in err.splitlines())
    assert exit_info.value.code == 2 and err.count("\n") == loading + 1
    assert message in err and "Traceback" not in err


def test_a_bad_weights_file_is_one_clear_message(data_dir, tmp_path, capsys):
    """(A refusal's real exit status in a process of its own: test_trust's checkpoint that cannot be written.)"""
    bad = tmp_path / "resnet18.pth"
    bad.write_text("junk")
    error = fails(finetune.main, ["--data-dir", str(data_dir), "--weights", str(bad), "--epochs", "1",
                                  "--batch-size", "8", "--out", str(tmp_path / "o")], capsys)
    assert "is not a PyTorch state_dict file" in error


def test_batch_that_does_not_split_over_devices(data_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cnn.main(["--data-dir", str(data_dir), "--batch-size", "7", "--out", str(tmp_path / "o")])
    assert exit_info.value.code == 2 and "does not split evenly over 2 devices" in capsys.readouterr().err


def test_existing_run_is_never_overwritten(one_epoch_run, capsys):
    out, data_dir = one_epoch_run
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with pytest.raises(SystemExit) as exit_info:
        cnn.main(["--data-dir", str(data_dir), "--epochs", "1", "--batch-size", "8", "--out", str(out)])
    assert exit_info.value.code == 2
    assert "already holds a run" in capsys.readouterr().err
    assert before == {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}


@pytest.mark.parametrize("unfreeze, scheduler", [("all", "CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED"), ("head", "default")])
def test_a_fresh_fine_tune_asks_for_its_schedule_before_the_backend_starts(data_dir, tmp_path, unfreeze, scheduler):
    """The run's settings decide XLA's schedule (`cifarjax.cpu.process`) before anything starts JAX's backend,
    which reads its flags once. The start is cut short where the data loads."""
    program = ("import sys, experiments.common as common\n"
               "from cifarjax.cpu import process\n"
               "def stop(*args, **kwargs):\n"
               "    print('scheduler', process.scheduler()); raise SystemExit(0)\n"
               "common.load_dataset = stop\n"
               "from experiments import finetune\n"
               "finetune.main(sys.argv[1:])\n")
    argv = ["--weights", "random", "--unfreeze", unfreeze, "--data-dir", str(data_dir), "--out", str(tmp_path / "r")]
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    result = subprocess.run([sys.executable, "-c", program, *argv], capture_output=True, text=True, cwd=ROOT, env=env)
    assert result.stdout.split() == ["scheduler", scheduler], result.stderr[-2000:]


@pytest.mark.parametrize("command", ["cnn", "finetune"])
def test_help_shows_the_defaults_a_run_gets(command):
    """Every settings flag's "(default: X)" is what a run without that flag uses (finetune: its three lengths),
    and each recipe's own value is named beside it."""
    from experiments import common
    from cifarjax.flags import new_config
    from cifarjax.recipes import RECIPES
    shown = {"n_epochs": " ".join(map(str, finetune.DEFAULT_EPOCHS))} if command == "finetune" else None
    parser = common.make_parser(command, "", shown=shown)
    actions = {a.dest: a.help for a in parser._actions if a.help and "(default: " in a.help}
    for name, recipe in RECIPES[command].items():
        config = new_config(command, name, {})
        for dest, text in actions.items():
            if not hasattr(config, dest) or dest == "recipe":
                continue
            value = finetune.epoch_counts(parser.parse_args([])) if dest == "n_epochs" and command == "finetune" \
                else getattr(config, dest)
            value = " ".join(map(str, value)) if isinstance(value, list) else "all" if value == () else str(value)
            parts = text.split("(default: ")[1].rstrip(")").split("; --recipe ")
            said = {"original": parts[0], **dict(p.split(": ", 1) for p in parts[1:])}
            assert said.get(name, said["original"]) == value, (command, name, dest, said, value)
    assert "(default: 20 50 100)" in actions["n_epochs"] or command == "cnn"
