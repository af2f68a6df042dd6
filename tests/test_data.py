import json
import pickle
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from cifarjax import data
from cifarjax.data import describe, load_dataset, split_indices, train_val_split
from cifarjax.errors import UserError
from cifarjax.files import cache_dir
from tests.helpers import make_image_folder


def test_image_folder_shapes_dtypes_and_labels(image_folder):
    ds = load_dataset(image_folder)
    assert ds.source == "folder" and ds.classes == ("cat", "dog", "frog")
    assert ds.train.images.shape == (36, 32, 32, 3) and ds.train.images.dtype == np.uint8
    assert ds.train.labels.dtype == np.int32 and set(ds.train.labels) == {0, 1, 2}
    assert ds.test.images.shape == (12, 32, 32, 3)
    first = np.asarray(Image.open(image_folder / "train" / "cat" / "0000.png"))
    np.testing.assert_array_equal(ds.train.images[0], first)


def test_folder_without_split_subfolders_is_a_train_split(tmp_path):
    make_image_folder(tmp_path / "d", n_train=3, n_test=0)
    ds = load_dataset(tmp_path / "d" / "train")
    assert len(ds.train) == 9 and ds.test is None


def test_test_only_folder_loads_just_the_test_split(tmp_path):
    make_image_folder(tmp_path / "d", n_train=3, n_test=2)
    import shutil
    shutil.rmtree(tmp_path / "d" / "train")
    ds = load_dataset(tmp_path / "d")
    assert ds.train is None and len(ds.test) == 6 and ds.classes == ("cat", "dog", "frog")


def test_split_is_seeded_disjoint_and_80_20():
    a_train, a_val = split_indices(1000, 0.2, seed=0)
    b_train, b_val = split_indices(1000, 0.2, seed=0)
    c_train, _ = split_indices(1000, 0.2, seed=1)
    np.testing.assert_array_equal(a_train, b_train)
    np.testing.assert_array_equal(a_val, b_val)
    assert not np.array_equal(a_train, c_train)
    assert len(a_train) == 800 and len(a_val) == 200
    assert set(a_train).isdisjoint(a_val) and set(a_train) | set(a_val) == set(range(1000))


def test_train_val_split_of_a_dataset(image_folder):
    train, val = train_val_split(load_dataset(image_folder))
    assert len(train) + len(val) == 36 and len(val) == 7


def test_second_load_comes_from_the_cache(image_folder, monkeypatch):
    first = load_dataset(image_folder)
    monkeypatch.setattr(data.sources, "decode_files", lambda *a, **k: pytest.fail("decoded again instead of cache"))
    second = load_dataset(image_folder)
    np.testing.assert_array_equal(first.train.images, second.train.images)
    assert list((cache_dir() / "datasets").glob("folder-*.npz"))


def test_cache_notices_changed_files(image_folder):
    before = load_dataset(image_folder)
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(image_folder / "train" / "cat" / "0000.png")
    after = load_dataset(image_folder)
    assert not np.array_equal(before.train.images[0], after.train.images[0])
    assert after.train.images[0].max() == 0


def test_other_image_sizes_are_cached_separately(image_folder):
    assert load_dataset(image_folder, size=16).train.images.shape == (36, 16, 16, 3)
    assert load_dataset(image_folder, size=32).train.images.shape == (36, 32, 32, 3)


def write_cifar_batches(folder, n_per_batch=10, seed=0):
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for name in names:
        batch = {"data": rng.integers(0, 256, (n_per_batch, 3072), dtype=np.uint8),
                 "labels": [int(v) for v in rng.integers(0, 10, n_per_batch)]}
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"c{i}" for i in range(10)]}, f)
    return rng


def test_cifar_batches_folder(tmp_path):
    write_cifar_batches(tmp_path / "cifar-10-batches-py")
    ds = load_dataset(tmp_path)
    assert ds.source == "cifar-10-batches-py" and len(ds.classes) == 10
    assert ds.train.images.shape == (50, 32, 32, 3) and ds.test.images.shape == (10, 32, 32, 3)
    with open(tmp_path / "cifar-10-batches-py" / "data_batch_1", "rb") as f:
        raw = pickle.load(f)["data"][0].reshape(3, 32, 32).transpose(1, 2, 0)
    np.testing.assert_array_equal(ds.train.images[0], raw)
    assert load_dataset(tmp_path / "cifar-10-batches-py").train.images.shape == (50, 32, 32, 3)


def test_cifar_batches_refuse_pickled_code(tmp_path):
    write_cifar_batches(tmp_path / "cifar-10-batches-py")
    with open(tmp_path / "cifar-10-batches-py" / "data_batch_3", "wb") as f:
        pickle.dump({"data": time.sleep, "labels": []}, f)
    with pytest.raises(UserError, match="data_batch_3 is not a CIFAR-10 python batch"):
        load_dataset(tmp_path)


def test_fake_source():
    ds = load_dataset(dataset="fake")
    assert ds.source == "fake" and ds.train.images.shape == (1000, 32, 32, 3) and len(ds.test) == 200
    np.testing.assert_array_equal(ds.train.images, load_dataset(dataset="fake").train.images)


def test_missing_folder(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_dataset(tmp_path / "nope")
    with pytest.raises(UserError, match="needs --data-dir"):
        load_dataset(dataset="folder")
    with pytest.raises(UserError, match="is a file"):
        (tmp_path / "f.txt").write_text("x")
        load_dataset(tmp_path / "f.txt")


def test_folder_without_images(tmp_path):
    (tmp_path / "empty" / "train" / "cat").mkdir(parents=True)
    with pytest.raises(UserError, match="no images found"):
        load_dataset(tmp_path / "empty")


def test_train_and_test_classes_disagree(tmp_path):
    make_image_folder(tmp_path / "d", n_train=2, n_test=2)
    (tmp_path / "d" / "test" / "frog").rename(tmp_path / "d" / "test" / "toad")
    with pytest.raises(UserError, match=r"only in train: \['frog'\], only in test: \['toad'\]"):
        load_dataset(tmp_path / "d")


def test_corrupt_image_is_named(image_folder):
    bad = image_folder / "train" / "dog" / "0003.png"
    bad.write_bytes(b"not a png at all")
    with pytest.raises(UserError, match=r"cannot read image .*dog/0003\.png"):
        load_dataset(image_folder)


def test_grayscale_rgba_and_odd_sizes_are_converted(tmp_path):
    make_image_folder(tmp_path / "d", n_train=2, n_test=0)
    Image.fromarray(np.full((40, 20), 200, np.uint8), "L").save(tmp_path / "d" / "train" / "cat" / "gray.png")
    Image.fromarray(np.full((32, 32, 4), 100, np.uint8), "RGBA").save(tmp_path / "d" / "train" / "dog" / "rgba.png")
    ds = load_dataset(tmp_path / "d")
    assert ds.train.images.shape == (8, 32, 32, 3)
    assert (ds.train.images[2] == 200).all()


@pytest.mark.parametrize("size", [0, 4, 5000])
def test_impossible_image_size(image_folder, size):
    with pytest.raises(UserError, match="image size"):
        load_dataset(image_folder, size=size)


def test_describe_counts_per_split(image_folder):
    info = describe(load_dataset(image_folder))
    assert info["classes"] == ["cat", "dog", "frog"]
    assert info["splits"]["train_folder"]["n"] == 36
    assert info["splits"]["train"]["n"] + info["splits"]["val"]["n"] == 36
    assert info["splits"]["test"]["per_class"] == {"cat": 4, "dog": 4, "frog": 4}


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "cifarjax.data", *map(str, args)], capture_output=True, text=True)


def test_inspection_command_prints_one_json_object(image_folder):
    result = run_cli(image_folder)
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert info["source"] == "folder" and info["splits"]["test"]["n"] == 12


def test_inspection_command_bad_folder_is_one_clear_line(tmp_path):
    result = run_cli(tmp_path / "missing")
    assert result.returncode == 2
    assert result.stderr.startswith("error: data folder") and "Traceback" not in result.stderr
