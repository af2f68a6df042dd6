"""A run is bound to what made it (issue 34): its data, its weights and its settings are recorded and checked,
and weights are what they claim to be."""
import json
import math
import os
import shutil
import zipfile

import jax
import numpy as np
import pytest

from cifarjax.checkpoint import load_variables
from cifarjax.data import fingerprint, load_dataset
from cifarjax.errors import UserError
from cifarjax.pretrained import (IMAGENET_DESCRIPTION, IMAGENET_SHA256, Weights, load_weights,
                                 resnet18_from_torchvision)
from experiments import cnn, evaluate, finetune, study
from tests.helpers import fails, make_image_folder, randomized_torchvision_resnet18


def save_resnet(path, seed=3, transform=None):
    import torch
    state = randomized_torchvision_resnet18(seed=seed).state_dict()
    torch.save({k: transform(v) for k, v in state.items()} if transform else state, path)
    return path


# ------------------------------------------------------------------------------------------------ weights

def test_imagenet_weights_are_recognised_by_their_sha256_only():
    assert Weights("x.pth", IMAGENET_SHA256).description == IMAGENET_DESCRIPTION == \
        "ImageNet weights (torchvision IMAGENET1K_V1, verified)"
    other = Weights("/w/resnet18-f37072fd.pth", "f37072fd" + "0" * 56).description  # the name's prefix is not enough
    assert "not torchvision's published ImageNet weights" in other and "/w/resnet18-f37072fd.pth" in other
    assert Weights("random").description == "random initialisation, no pretraining"
    assert Weights("x.pth", IMAGENET_SHA256).imagenet and not Weights("random").pretrained


def test_a_zip_member_that_fails_its_crc_is_refused(tmp_path):
    path = save_resnet(tmp_path / "w.pth")
    with zipfile.ZipFile(path) as archive:
        member = max(archive.infolist(), key=lambda i: i.file_size)  # a tensor's bytes, stored uncompressed
    data = bytearray(path.read_bytes())
    start = member.header_offset + 30 + len(member.filename.encode()) + \
        int.from_bytes(data[member.header_offset + 28:member.header_offset + 30], "little")
    data[start + member.file_size // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(UserError, match=rf"member {member.filename} fails its CRC check"):
        resnet18_from_torchvision(path)


def test_the_hash_in_a_torchvision_name_is_checked_even_when_the_conversion_is_cached(tmp_path):
    path = save_resnet(tmp_path / "mine.pth")
    variables, digest = load_weights(path, tmp_path / "cache")  # converted and cached, keyed by the SHA-256
    named = tmp_path / f"resnet18-{'0' * 8}.pth"
    shutil.copy(path, named)
    with pytest.raises(UserError, match=rf"its SHA-256 starts {digest[:8]}, its name promises 00000000"):
        load_weights(named, tmp_path / "cache")
    honest = tmp_path / f"resnet18-{digest[:8]}.pth"
    shutil.copy(path, honest)
    assert load_weights(honest, tmp_path / "cache")[1] == digest
    save_resnet(path, seed=4)  # the same path, other weights: no cache hit can hide the change
    other, other_digest = load_weights(path, tmp_path / "cache")
    assert other_digest != digest
    assert not np.array_equal(other["params"]["backbone"]["conv1"]["kernel"],
                              variables["params"]["backbone"]["conv1"]["kernel"])


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float64"])
def test_every_float_dtype_in_a_weights_file_is_converted(tmp_path, dtype):
    import torch
    path = save_resnet(tmp_path / "w.pth", transform=lambda t: t.to(getattr(torch, dtype))
                       if t.is_floating_point() else t)
    variables = resnet18_from_torchvision(path)
    expected = randomized_torchvision_resnet18(seed=3).conv1.weight.detach().to(getattr(torch, dtype)).float()
    got = variables["params"]["backbone"]["conv1"]["kernel"]
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, expected.numpy().transpose(2, 3, 1, 0))


@pytest.mark.parametrize("kind, message", [
    ("sparse", r"tensor layer1\.0\.conv1\.weight is stored as sparse_coo, not as a dense tensor"),
    ("quantized", r"tensor layer1\.0\.conv1\.weight is quantized \(qint8\)"),
    ("integer", r"tensor layer1\.0\.conv1\.weight holds int32 values where weights are floating point"),
    ("complex32", r"tensor layer1\.0\.conv1\.weight holds complex32 values where"),  # numpy has no such type
    ("nan", r"tensor layer1\.0\.conv1\.weight holds 1 non-finite value\(s\) .* the weights are damaged")])
def test_tensors_that_are_not_dense_finite_floats_are_refused_in_one_line(tmp_path, kind, message):
    import torch
    state = randomized_torchvision_resnet18(seed=3).state_dict()
    t = state["layer1.0.conv1.weight"]
    state["layer1.0.conv1.weight"] = {"sparse": lambda: t.to_sparse(),
                                      "quantized": lambda: torch.quantize_per_tensor(t, 0.01, 0, torch.qint8),
                                      "integer": lambda: t.to(torch.int32),
                                      "complex32": lambda: t.to(torch.complex32),
                                      "nan": lambda: t.index_put_((torch.tensor([0]),) * 4,
                                                                  torch.tensor(float("nan")))}[kind]()
    torch.save(state, tmp_path / "w.pth")
    with pytest.raises(UserError, match=message):
        resnet18_from_torchvision(tmp_path / "w.pth")


# ------------------------------------------------------------------------------------------------ data

def test_the_data_fingerprint_follows_the_images_not_the_folder(tmp_path, data_dir):
    before = fingerprint(load_dataset(data_dir))
    moved = shutil.copytree(data_dir, tmp_path / "moved")
    assert fingerprint(load_dataset(moved)) == before
    shutil.copy(data_dir / "train" / "cat" / "0000.png", data_dir / "train" / "cat" / "extra.png")
    after = fingerprint(load_dataset(data_dir))
    assert after["sha256"] != before["sha256"] and after["images"]["train"] == before["images"]["train"] + 1


def test_a_run_is_bound_to_its_data(tmp_path, data_dir, capsys, monkeypatch):
    """A relative --data-dir is stored absolute (evaluate and --resume from another folder use the run's data);
    images added afterwards are refused by --resume and evaluate; the same images moved are accepted. The same run
    and resume also show what a resume continues and records (once test_experiments' own 1-epoch run and resume):
    each session's closing line and summary count this process's images and time, labelling all sessions' as such;
    every session's command is recorded; a finished run resumed with its own settings trains nothing; a changed
    setting is refused."""
    monkeypatch.chdir(tmp_path)
    args = ["--data-dir", "data", "--epochs", "1", "--batch-size", "8", "--conv-impl", "xla", "--out", "run"]
    cnn.main(args)
    line = capsys.readouterr().out
    assert "last-1 mean" in line and "this process trained 48 images" in line and "sessions" not in line
    run = tmp_path / "run"
    config = json.loads((run / "config.json").read_text())
    assert config["data_dir"] == str(data_dir) and config["data_fingerprint"]["images"] == {"train": 60, "test": 18}
    assert config["commands"] == ["python -m experiments.cnn " + " ".join(args)]
    error = fails(finetune.main, ["--resume", "--out", str(run), "--epochs", "2"], capsys)
    assert "is a SimpleCNN run made by experiments.cnn" in error  # the model first: the data has not changed yet
    elsewhere = tmp_path / "elsewhere"
    make_image_folder(elsewhere / "data", n_train=5, n_test=2)  # another "data" where the run is looked at from
    monkeypatch.chdir(elsewhere)
    evaluate.main([str(run), "--json"])
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["n"] == 18  # the run's own test images
    moved = shutil.copytree(data_dir, tmp_path / "moved")
    shutil.copy(data_dir / "train" / "cat" / "0000.png", data_dir / "train" / "cat" / "extra.png")
    resume = ["--resume", "--out", str(run), "--epochs", "2"]
    error = fails(cnn.main, resume, capsys)
    assert f"the data in {data_dir} differs from the run's" in error and "79 images now, 78 when the run started" \
        in error and "--data-dir" in error
    assert "differs from the run's" in fails(evaluate.main, [str(run)], capsys)
    assert len(json.loads((run / "config.json").read_text())["commands"]) == 1  # a refused resume changed nothing
    cnn.main(resume + ["--data-dir", "../moved"])  # moved data, same images: fine (and stored absolute)
    config = json.loads((run / "config.json").read_text())
    assert config["data_dir"] == str(moved) and config["n_epochs"] == 2
    assert config["commands"] == ["python -m experiments.cnn " + " ".join(a) for a in (args, resume + [
        "--data-dir", "../moved"])]  # each session's own arguments
    summary = json.loads((run / "summary.json").read_text())
    assert summary["commands"] == config["commands"]
    assert summary["epochs"] == 2 and len((run / "metrics.jsonl").read_text().splitlines()) == 2
    # the closing line's figures add up: this process's images and time; all sessions' time labelled as such
    line, mine = capsys.readouterr().out, summary["this_process"]
    assert mine["images_trained"] == 48 and "this process trained 48 images: " in line  # 6 steps of 8
    assert "last-2 mean" in line and "over all 2 sessions" in line and summary["sessions"] == 2
    trained, seconds = mine["images_trained"] - mine["compile_images"], mine["training_seconds"]  # 0.01 s rounded
    assert trained > 0 and trained / (seconds + 0.005) - 0.05 <= mine["images_per_second"] <= \
        (trained / (seconds - 0.005) + 0.05 if seconds > 0.005 else math.inf)
    own = ["--data-dir", str(moved), "--batch-size", "8", "--conv-impl", "xla", "--out", str(run)]
    cnn.main(own + ["--epochs", "2", "--resume"])  # already finished: nothing to train (its own settings repeated)
    line = capsys.readouterr().out
    assert "this process trained nothing (the run had already finished)" in line and "images/s" not in line
    assert len(json.loads((run / "summary.json").read_text())["commands"]) == 3
    refused = fails(cnn.main, own + ["--epochs", "3", "--resume", "--crop-padding", "2"], capsys)
    assert "crop_padding: 0 → 2" in refused


# ------------------------------------------------------------------------------------------------ weights of a run

def test_a_fine_tune_is_bound_to_its_model_and_its_own_backbone(tmp_path, capsys):
    """The frozen-bn recipe keeps the whole backbone, BatchNorm statistics included, bit for bit and trains the head
    on cached features; the lengths share one frozen backbone file; replacing the weights file at the same path does
    not change a resumed run's backbone; cnn --resume of a fine-tune run is refused, naming the model (the reverse:
    test_a_run_is_bound_to_its_data). Then the same run, as if stopped before its first checkpoint, must start over:
    it has nothing of its own to resume from but its frozen backbone, so the weights file must then be the one it
    started from (one fine-tune serves both: the refusal comes before anything trains, whatever the recipe)."""
    # Half data_dir's images (24 training, 6 validation, 6 test): each length still trains and scores on its own
    # split, and what is bound (weights, backbone, frozen file) does not depend on the number of images.
    data_dir = make_image_folder(tmp_path / "data", n_train=10, n_test=2, learnable=True)
    weights = save_resnet(tmp_path / "resnet18.pth", seed=3)
    out = tmp_path / "ft"
    base = ["--data-dir", str(data_dir), "--batch-size", "8", "--weights", str(weights), "--conv-impl", "xla",
            "--out", str(out), "--recipe", "frozen-bn"]  # BatchNorm frozen too: the whole backbone stays
    finetune.main(base + ["--epochs", "1", "2"])
    printed = capsys.readouterr().out
    assert "not torchvision's published ImageNet weights" in printed.splitlines()[-1]
    assert [p.relative_to(out).as_posix() for p in out.rglob("frozen_params.npz")] == ["frozen_params.npz"]
    for sub in ("epochs-1", "epochs-2"):
        ref = json.loads((out / sub / "config.json").read_text())["frozen_params"]
        assert ref["path"] == "../frozen_params.npz" and len(ref["sha256"]) == 64
    original = load_variables(out / "epochs-2")
    port = resnet18_from_torchvision(weights, num_classes=3)
    for a, b in zip(jax.tree.leaves((port["params"]["backbone"], port["batch_stats"])),
                    jax.tree.leaves((original["params"]["backbone"], original["batch_stats"]))):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(port["params"]["head"]["kernel"], original["params"]["head"]["kernel"])
    config = json.loads((out / "epochs-2" / "config.json").read_text())
    assert (config["unfreeze"], config["bn"], config["recipe"]) == ("head", "frozen", "frozen-bn")
    assert json.loads((out / "epochs-2" / "summary.json").read_text())["cached_features"]

    error = fails(cnn.main, ["--resume", "--out", str(out / "epochs-2"), "--epochs", "3"], capsys)
    assert "is a ResNet-18 run made by experiments.finetune" in error and "experiments.cnn trains a SimpleCNN" in error

    save_resnet(weights, seed=5)  # today's file at the same path holds other weights
    finetune.main(["--resume", "--out", str(out), "--epochs", "1", "3"])
    capsys.readouterr()
    resumed = load_variables(out / "epochs-3")
    for a, b in zip(jax.tree.leaves(original["params"]["backbone"]), jax.tree.leaves(resumed["params"]["backbone"])):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(jax.tree.leaves(original["batch_stats"]), jax.tree.leaves(resumed["batch_stats"])):
        np.testing.assert_array_equal(a, b)
    assert list(out.rglob("frozen_params.npz")) == [out / "frozen_params.npz"]

    intact = (out / "frozen_params.npz").read_bytes()
    (out / "frozen_params.npz").write_bytes(intact[:-2000] + bytes(2000))
    assert "frozen_params.npz" in fails(evaluate.main, [str(out / "epochs-3")], capsys)

    (out / "frozen_params.npz").write_bytes(intact)
    for checkpoints in list(out.rglob("checkpoints")):
        shutil.rmtree(checkpoints)  # as if it stopped before its first checkpoint (its weights file is seed 5's now)
    error = fails(finetune.main, ["--resume", "--out", str(out)], capsys)
    assert f"the weights file {weights} changed since the run started" in error and "1 epoch fine-tune" in error


# ------------------------------------------------------------------------------------------------ a study

def test_a_study_is_bound_to_its_settings_and_says_its_weights_are_not_imagenet(tmp_path, capsys):
    data = make_image_folder(tmp_path / "data", n_train=20, n_test=0, learnable=True)  # data_dir's split sizes
    weights = save_resnet(tmp_path / "resnet18.pth", seed=3)
    out = tmp_path / "study"
    reference = tmp_path / "cnn"  # the SimpleCNN reference, trained on the study's split for its 1 epoch
    cnn.main(["--data-dir", str(data), "--epochs", "1", "--batch-size", "8", "--conv-impl", "xla",
              "--out", str(reference)])
    args = ["--data-dir", str(data), "--weights", str(weights), "--epochs", "1", "--batch-size", "8",
            "--conv-impl", "xla", "--cells", "baseline", "--out", str(out)]
    for wrong, message in ((tmp_path / "resnet", "is a resnet18 run; the reference is a SimpleCNN"),
                           (tmp_path / "longer", "(n_epochs: 4 there, 1 here)")):
        (wrong / "checkpoints").mkdir(parents=True)
        config = json.loads((reference / "config.json").read_text())
        config.update({"model": "resnet18"} if wrong.name == "resnet" else {"n_epochs": 4})
        (wrong / "config.json").write_text(json.dumps(config))
        assert message in fails(study.main, args[:-1] + [str(tmp_path / "refused"), "--cnn-run", str(wrong)], capsys)
        assert not (tmp_path / "refused").exists()
    study.main(args + ["--cnn-run", str(reference)])
    closing = capsys.readouterr().out.strip().splitlines()[-1]
    assert "not torchvision's published ImageNet weights" in closing
    answer = json.loads((out / "study.json").read_text())
    assert answer["answers_the_question"] is False and answer["imagenet"] is False
    assert answer["cnn_run"] == str(reference.resolve()) and "simple_cnn" in [c["name"] for c in answer["cells"]]
    assert answer["settings"]["n_epochs"] == 1 and len(answer["settings"]["weights_sha256"]) == 64
    first = (out / "study.md").read_text().splitlines()[0]
    assert "not torchvision's published ImageNet weights" in first and str(weights) in first

    other = save_resnet(tmp_path / "other.pth", seed=4)
    error = fails(study.main, ["--resume", "--out", str(out), "--epochs", "2", "--subset", "6", "--batch-size", "4",
                               "--weights", str(other)], capsys)
    for named in ("n_epochs: 1 → 2", "subset: 0 → 6", "batch_size: 8 → 4", f"weights: '{weights}' → '{other}'",
                  "weights_sha256"):
        assert named in error, named
    shutil.copy(data / "train" / "cat" / "0000.png", data / "train" / "cat" / "extra.png")
    assert "data_fingerprint" in fails(study.main, ["--resume", "--out", str(out)], capsys)
    os.remove(data / "train" / "cat" / "extra.png")
    assert "took its SimpleCNN reference from" in fails(
        study.main, ["--resume", "--out", str(out), "--cnn-run", str(tmp_path / "resnet")], capsys)
    study.main(["--resume", "--out", str(out), "--cells", "baseline"])  # its own settings; nothing left to train
    assert "estimated training time" not in capsys.readouterr().out

