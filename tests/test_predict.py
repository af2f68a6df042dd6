"""Classifying new images with a finished run: `cifarjax.load_run` and `python -m experiments.predict`."""
import json
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest
from PIL import Image

import cifarjax as cj
from cifarjax.checkpoint import load_variables
from cifarjax.predictor import predict as predicted_classes
from experiments import cnn, evaluate, predict
from tests.helpers import make_image_folder, run_module

CLASSES = ("cat", "dog", "frog")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny finished run with every preprocessing step a prediction must repeat: images decoded at 24 pixels and
    resized to 32 on the device, dataset normalisation, test-time flips, and a moving average of the weights."""
    root = tmp_path_factory.mktemp("predict")
    data = make_image_folder(root / "data", CLASSES, n_train=20, n_test=0, learnable=True)
    run = root / "run"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CIFARJAX_CACHE", str(root / "cache"))
        cnn.main(["--data-dir", str(data), "--epochs", "2", "--batch-size", "8", "--conv-impl", "xla",
                  "--decode-size", "24", "--normalize", "dataset", "--tta-flip", "--ema-decay", "0.9",
                  "--out", str(run)])
    return run


def write_photos(folder):
    """Images of several modes and sizes, as a user's own photos are, under class folders; returns their paths."""
    rng = np.random.default_rng(5)
    colour = lambda c, shape: np.clip(rng.integers(0, 256, shape) // 4 + 64 * c, 0, 255).astype(np.uint8)  # noqa
    made = []
    for c, name in enumerate(CLASSES):
        (folder / name).mkdir(parents=True)
        images = {"a.png": Image.fromarray(colour(c, (32, 32, 3))),  # the data's own size
                  "b.jpg": Image.fromarray(colour(c, (45, 60, 3))),  # larger, not square, JPEG
                  "c.png": Image.fromarray(colour(c, (20, 20, 4)), "RGBA"),  # alpha, smaller
                  "d.png": Image.fromarray(colour(c, (32, 32))[..., 0].astype(np.uint16) * 257)}  # 16-bit grey
        for file, image in images.items():
            image.save(folder / name / file)
            made.append(folder / name / file)
    return made


def test_predictions_are_the_evaluations_own(trained, tmp_path, capsys):
    photos = write_photos(tmp_path / "labelled" / "test")
    run = cj.load_run(trained)
    assert run.classes == CLASSES and run.weights == "moving average" and run.config.tta_flip
    average = load_variables(trained, average=True)
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(run.variables), jax.tree.leaves(average)))

    by_file = run.predict_files(photos)
    assert list(by_file) == [str(p) for p in photos]
    probs = np.stack(list(by_file.values()))
    assert probs.dtype == np.float32 and probs.shape == (12, 3)
    np.testing.assert_allclose(probs.sum(1), 1, rtol=1e-6)

    # The data loader reads the same files into the same pixels, and evaluation sees them as the prediction did.
    test = cj.load_dataset(tmp_path / "labelled", size=run.config.decode_size).test
    assert np.array_equal(run.predict(test.images), probs)  # bitwise: the same images through the same program
    assert np.array_equal(probs.argmax(1), predicted_classes(run.config, run.variables, test))
    evaluate.main([str(trained), "--data-dir", str(tmp_path / "labelled"), "--json"])
    accuracy = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["accuracy"]
    assert abs(accuracy - np.mean(probs.argmax(1) == test.labels)) <= 5e-6  # evaluate --json rounds to 5 decimals
    assert run.evaluate(test)["accuracy"] == np.mean(probs.argmax(1) == test.labels)

    top = run.top(probs[0], 2)
    assert [c for c, _ in top] == [CLASSES[i] for i in np.argsort(-probs[0])[:2]] and top[0][1] == probs[0].max()
    with pytest.raises(cj.UserError, match="uint8"):
        run.predict(test.images.astype(np.float32))


def test_command_prints_a_table_and_json_and_skips_an_unreadable_image(trained, tmp_path, capsys):
    photos = write_photos(tmp_path / "photos")
    broken = tmp_path / "photos" / "cat" / "broken.jpg"
    broken.write_bytes(b"not an image")
    (tmp_path / "photos" / ".hidden.png").write_bytes(b"skipped: hidden")
    (tmp_path / "photos" / "notes.txt").write_text("skipped: not an image file")
    expected = cj.load_run(trained).predict_files(photos)

    predict.main([str(trained), str(tmp_path / "photos"), "--top", "2"])
    captured = capsys.readouterr()
    assert captured.err.strip().splitlines() == [f"warning: cannot read image {broken} "
                                                 f"(UnidentifiedImageError: cannot identify image file "
                                                 f"'{broken}'); it is skipped"]
    lines = captured.out.strip().splitlines()
    assert lines[0] == f"{trained} (moving average weights, test-time flips)"
    assert lines[1].split() == ["image", "top", "1", "top", "2"]
    rows = {line.split()[0]: line.split()[1:] for line in lines[2:]}
    assert set(rows) == set(expected)  # every readable image, once; the broken one left out
    for path, probs in expected.items():
        best = np.argsort(-probs)[:2]
        assert rows[path] == [x for i in best for x in (CLASSES[i], f"{100 * probs[i]:.1f}%")]

    predict.main([str(trained), str(photos[0]), str(broken), "--json", "--top", "5"])
    captured = capsys.readouterr()
    result = json.loads(captured.out)
    assert result["unreadable"] == [str(broken)] and result["weights"] == "moving average"
    [only] = result["predictions"]
    assert only["path"] == str(photos[0]) and len(only["top"]) == 3  # --top beyond the classes shows them all
    # One image alone runs a program of another batch shape, whose float32 sums may round differently from the
    # batch of twelve's: probabilities agree to 1e-5 (measured: 3e-10), not bit for bit.
    np.testing.assert_allclose([t["probability"] for t in only["top"]],
                               np.sort(expected[str(photos[0])])[::-1], rtol=0, atol=1e-5)


@pytest.mark.parametrize("case, message", [
    ("missing run", "does not exist; pass the --out folder of a finished run"),
    ("not a run", "holds no checkpoints; pass the --out folder of a run that finished an epoch"),
    ("no config", "config.json is missing"),
    ("no images", "no images to classify in"),
    ("none readable", "none of the 1 image(s) could be read"),
    ("bad top", "--top must be at least 1"),
    ("swapped", "is a file, not a run folder"),
    ("missing image", "no such file or folder"),
])
def test_bad_input_is_one_clear_line(trained, tmp_path, capsys, case, message):
    image = tmp_path / "photo.png"
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(image)
    empty = tmp_path / "empty"
    empty.mkdir()
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG truncated")
    no_config = tmp_path / "no_config"
    shutil.copytree(trained / "checkpoints", no_config / "checkpoints")
    args = {"missing run": [tmp_path / "nowhere", image], "not a run": [empty, image], "no config": [no_config, image],
            "no images": [trained, empty], "none readable": [trained, broken],
            "bad top": [trained, image, "--top", "0"], "swapped": [image, trained],
            "missing image": [trained, tmp_path / "nowhere.jpg"]}[case]
    with pytest.raises(SystemExit) as exit_info:
        predict.main([str(a) for a in args])
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.splitlines()
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], errors
    assert case == "none readable" or not any(line.startswith("warning:") for line in lines), lines


def test_the_library_names_a_missing_image_and_a_missing_split(trained, tmp_path, capsys):
    run = cj.load_run(trained)
    with pytest.raises(cj.UserError, match=r"my_cat\.jpg does not exist; check the path$"):
        run.predict_files([tmp_path / "my_cat.jpg"])
    assert run.predict_files([tmp_path / "my_cat.jpg"], skip_unreadable=True) == {}
    assert "my_cat.jpg does not exist; it is skipped" in capsys.readouterr().err
    with pytest.raises(cj.UserError, match="got NoneType; this dataset has no test split"):
        run.evaluate(None)  # `data.test` of a folder without test/
    with pytest.raises(cj.UserError, match=r"one image's 3 class probabilities .* got shape \(2,\)"):
        run.top([0.1, 0.2])


def test_command_in_its_own_process(trained, tmp_path):
    """`python -m experiments.predict` as a user starts it (a refusal's real exit status in a process of its own:
    tests/test_trust.py's checkpoint that cannot be written)."""
    image = tmp_path / "photo.png"
    Image.fromarray(np.full((32, 32, 3), 128, np.uint8)).save(image)
    done = run_module("experiments.predict", trained, image, "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["predictions"][0]["path"] == str(image)


def test_a_run_says_which_weights_predict_where_training_stopped_and_what_it_started_from():
    from cifarjax.config import Config
    from cifarjax.predictor import Run
    config = Config(n_epochs=20)
    assert Run(Path("r"), config, {}, False, 20.0).description == "final weights"
    unfinished = Run(Path("r"), config, {}, True, 3.0, "random initialisation, no pretraining")
    assert unfinished.description == ("moving average weights, 3 of 20 epochs (unfinished), random initialisation, "
                                      "no pretraining")
