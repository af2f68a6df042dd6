import errno
import json
import os
import pickle
import time

import numpy as np
import pytest
from PIL import Image

from cifarjax import data
from cifarjax.data import describe, load_dataset, split_indices, train_val_split
from cifarjax.errors import UserError
from cifarjax.runs import cache_dir
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


def test_inspection_command_prints_one_json_object(image_folder, capsys):
    data.main([str(image_folder), "--decode-size", "32"])
    info = json.loads(capsys.readouterr().out)
    assert info["source"] == "folder" and info["splits"]["test"]["n"] == 12


def test_inspection_command_bad_folder_is_one_clear_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        data.main([str(tmp_path / "missing")])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.startswith("error: data folder") and err.count("\n") == 1


# ------------------------------------------------------------------------------------------------ malformed data

def write_batch(folder, name, **batch):
    with open(folder / name, "wb") as f:
        pickle.dump(batch, f)


@pytest.mark.parametrize("name,batch,message", [
    ("data_batch_2", {"data": np.zeros((10, 3072), np.uint8), "labels": [0] * 9}, "holds 10 images but 9 labels"),
    ("data_batch_3", {"data": np.zeros((10, 1024), np.uint8), "labels": [0] * 10}, r"shape \(10, 1024\)"),
    ("data_batch_4", {"data": np.zeros((10, 3072), np.float32), "labels": [0] * 10}, "float32 array"),
    ("data_batch_5", {"labels": [0] * 10}, "lacks the key.*data"),
    ("test_batch", {"data": np.zeros((10, 3072), np.uint8), "labels": [0] * 9 + [10]}, r"outside \[0, 10\)"),
    ("data_batch_1", {"data": np.zeros((10, 3072), np.uint8), "labels": [-1] * 10}, r"outside \[0, 10\)"),
])
def test_malformed_cifar_batches_are_named(tmp_path, name, batch, message):
    write_cifar_batches(tmp_path / "cifar-10-batches-py")
    write_batch(tmp_path / "cifar-10-batches-py", name, **batch)
    with pytest.raises(UserError, match=f"{name}.*{message}"):
        load_dataset(tmp_path)


def test_malformed_class_names(tmp_path):
    write_cifar_batches(tmp_path / "cifar-10-batches-py")
    write_batch(tmp_path / "cifar-10-batches-py", "batches.meta", names=["a"])
    with pytest.raises(UserError, match="batches.meta has no list of class names"):
        load_dataset(tmp_path)


def save_mode(folder, name, image):
    folder.mkdir(parents=True, exist_ok=True)
    image.save(folder / name)


def test_every_image_mode_becomes_the_right_rgb_picture(tmp_path):
    """Each mode Pillow opens decodes to the 8-bit RGB picture it shows (a 16-bit PNG is not saturated white)."""
    rgb = np.zeros((32, 32, 3), np.uint8)
    rgb[..., 0], rgb[..., 1], rgb[..., 2] = 200, 30, 60
    gray16 = np.full((32, 32), 32896, np.uint16)  # 32896 / 65535 * 255 = 128
    cases = {
        "a_rgb.png": (Image.fromarray(rgb), rgb),
        "b_rgba.png": (Image.fromarray(np.dstack([rgb, np.full((32, 32), 7, np.uint8)]), "RGBA"), rgb),
        "c_l.png": (Image.fromarray(np.full((32, 32), 77, np.uint8), "L"), np.full((32, 32, 3), 77)),
        "d_la.png": (Image.fromarray(np.full((32, 32, 2), 90, np.uint8), "LA"), np.full((32, 32, 3), 90)),
        "e_one.png": (Image.fromarray(np.ones((32, 32), bool)), np.full((32, 32, 3), 255)),
        "f_p.png": (Image.fromarray(rgb).quantize(colors=4), rgb),
        "g_i16.png": (Image.fromarray(gray16), np.full((32, 32, 3), 128)),
        "h_i32.tif": (Image.fromarray(np.full((32, 32), 40000, np.int32), "I"), np.full((32, 32, 3), 156)),
        "i_i8.tif": (Image.fromarray(np.full((32, 32), 100, np.int32), "I"), np.full((32, 32, 3), 100)),
        "j_f.tif": (Image.fromarray(np.full((32, 32), 0.5, np.float32), "F"), np.full((32, 32, 3), 128)),
        "k_cmyk.jpg": (Image.fromarray(rgb).convert("CMYK"), rgb),
        "l_ycbcr.jpg": (Image.fromarray(rgb).convert("YCbCr"), rgb),
    }
    folder = tmp_path / "d" / "train" / "modes"
    for name, (image, _) in cases.items():
        save_mode(folder, name, image)
    make_image_folder(tmp_path / "d", classes=("other",), n_train=1, n_test=0)
    ds = load_dataset(tmp_path / "d")
    assert ds.classes == ("modes", "other")
    for (name, (_, expected)), got in zip(sorted(cases.items()), ds.train.images[:len(cases)]):
        tolerance = 6 if name.endswith(".jpg") else 1  # JPEG's lossy colour conversion
        assert np.abs(got.astype(int) - np.asarray(expected, int)).max() <= tolerance, name


@pytest.mark.parametrize("array,mode", [(np.full((8, 8), 1e9, np.float32), "F"), (np.full((8, 8), -5, np.int32), "I")])
def test_images_outside_known_ranges_are_refused(tmp_path, array, mode):
    save_mode(tmp_path / "d" / "train" / "c", "odd.tif", Image.fromarray(array, mode))
    with pytest.raises(UserError, match=r"cannot read image .*odd\.tif.*outside 8- or 16-bit ranges"):
        load_dataset(tmp_path / "d")


def test_empty_class_folder_is_skipped_with_a_warning(tmp_path, capsys):
    make_image_folder(tmp_path / "d", classes=("cat", "dog"), n_train=2, n_test=0)
    (tmp_path / "d" / "train" / "bird").mkdir()
    ds = load_dataset(tmp_path / "d")
    assert ds.classes == ("cat", "dog") and len(ds.train) == 4
    assert "bird holds no images" in capsys.readouterr().err


def test_labels_outside_the_classes_are_refused_before_training():
    from cifarjax.loop import train_loop
    from tests.test_train import fast, tiny_split
    bad = tiny_split(40)
    bad.labels[3] = 7
    with pytest.raises(UserError, match=r"training labels: 1 label\(s\) outside \[0, 3\)"):
        train_loop(fast(n_epochs=1), bad, tiny_split(12, seed=1))


def test_a_cache_file_that_does_not_match_its_source_is_rebuilt(tmp_path, capsys):
    a = make_image_folder(tmp_path / "a", n_train=2, n_test=0, seed=1)
    b = make_image_folder(tmp_path / "b", n_train=2, n_test=0, seed=2)
    load_dataset(a)
    load_dataset(b)
    files = sorted((cache_dir() / "datasets").glob("folder-*.npz"))
    assert len(files) == 2
    first_bytes, second_bytes = files[0].read_bytes(), files[1].read_bytes()
    files[0].write_bytes(second_bytes)  # well-formed, but each holds the other source's arrays
    files[1].write_bytes(first_bytes)
    first = np.asarray(Image.open(a / "train" / "cat" / "0000.png"))
    np.testing.assert_array_equal(load_dataset(a).train.images[0], first)
    assert "do not match their source" in capsys.readouterr().err


def test_an_unusable_cache_folder_never_blocks_a_run(tmp_path, monkeypatch, capsys, image_folder):
    (tmp_path / "a-file").write_text("x")
    monkeypatch.setenv("CIFARJAX_CACHE", str(tmp_path / "a-file" / "cache"))
    assert len(load_dataset(image_folder).train) == 36
    assert "continuing without the cache" in capsys.readouterr().err


def test_a_full_disk_leaves_no_temporary_files(tmp_path, monkeypatch, capsys, image_folder):
    def full(f, **arrays):
        f.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device", str(f.name))
    monkeypatch.setattr(np, "savez", full)
    assert len(load_dataset(image_folder).train) == 36
    assert "No space left" in capsys.readouterr().err
    assert [p.name for p in (cache_dir() / "datasets").iterdir()] == []


def test_an_archive_as_data_folder_says_how_to_unpack_it(tmp_path):
    import tarfile
    import zipfile
    make_image_folder(tmp_path / "src" / "cifar10-jpeg", n_train=1, n_test=0)
    archive = tmp_path / "data.tar.gz"
    with tarfile.open(archive, "w:gz") as t:
        t.add(tmp_path / "src" / "cifar10-jpeg", arcname="cifar10-jpeg")
    with pytest.raises(UserError, match=r"is an archive; unpack it first \(tar xzf .*data\.tar\.gz -C DIR\), "
                                        r"then pass --data-dir DIR/cifar10-jpeg$"):
        load_dataset(archive)
    with zipfile.ZipFile(tmp_path / "d.zip", "w") as z:
        z.writestr("images/x.txt", "x")
    with pytest.raises(UserError, match=r"unzip .*d\.zip -d DIR\), then pass --data-dir DIR/images$"):
        load_dataset(tmp_path / "d.zip")
    (tmp_path / "broken.tgz").write_bytes(b"not gzip")
    with pytest.raises(UserError, match=r"is an archive; unpack it first .*DIR \(or the folder it unpacked into\)"):
        load_dataset(tmp_path / "broken.tgz")


def test_the_folder_one_level_above_the_data_names_the_data(tmp_path, capsys):
    """`tar xzf cifar10-jpeg-train.tar.gz -C DIR` makes DIR/cifar10-jpeg/train/...: --data-dir DIR is one level too
    high, and must say where the data is rather than warn that `cifar10-jpeg` is an empty class."""
    make_image_folder(tmp_path / "unpacked" / "cifar10-jpeg", n_train=1, n_test=0)
    with pytest.raises(UserError, match=r"unpacked holds no train/ folder, but .*unpacked/cifar10-jpeg does: "
                                        r"pass --data-dir .*unpacked/cifar10-jpeg$"):
        load_dataset(tmp_path / "unpacked")
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("form", ["absolute", "relative", "dot"])
def test_folder_cache_key_is_the_same_however_the_folder_is_named(tmp_path, monkeypatch, form):
    """The fingerprint's relative names come from string slicing (a Path per file is slow): they must equal
    str(Path.relative_to(root)) for every way of naming the folder, or every cache entry would be rebuilt."""
    from pathlib import Path
    root = make_image_folder(tmp_path / "d", n_train=2, n_test=1)
    monkeypatch.chdir(tmp_path if form == "relative" else root)
    given = {"absolute": root, "relative": Path("d"), "dot": Path(".")}[form]
    keys = []
    monkeypatch.setattr(data, "_cached", lambda kind, r, size, fingerprint, build: keys.append(fingerprint))
    load_dataset(given)
    expected = {}
    for s in ("train", "test"):
        paths = sorted(map(str, (root / s).rglob("*.png")))
        expected[s] = data.sources.content_digest(paths, [str(Path(p).relative_to(root)) for p in paths])
    assert keys == [expected]


def test_the_cache_notices_changed_bytes_whose_sizes_and_times_were_kept(image_folder):
    """Two same-sized images swapped between classes, their times restored: the cache is keyed by content,
    so the swap is decoded afresh rather than served from the stale arrays."""
    a, b = image_folder / "train" / "cat" / "0000.png", image_folder / "train" / "dog" / "0000.png"
    Image.fromarray(np.full((32, 32, 3), 10, np.uint8)).save(a)
    Image.fromarray(np.full((32, 32, 3), 200, np.uint8)).save(b)
    assert a.stat().st_size == b.stat().st_size
    before = load_dataset(image_folder)  # cached
    times = [(p.stat().st_atime_ns, p.stat().st_mtime_ns) for p in (a, b)]
    content_a, content_b = a.read_bytes(), b.read_bytes()
    a.write_bytes(content_b), b.write_bytes(content_a)
    for p, t in zip((a, b), times):
        os.utime(p, ns=t)
    after = load_dataset(image_folder)
    assert before.train.images[0].max() == 10 and after.train.images[0].max() == 200  # cat/0000.png, first


def test_a_torchvision_that_cannot_be_imported_is_one_line_with_the_fix(tmp_path):
    """A torch/torchvision mismatch fails inside torchvision's operator registration with a 30-line traceback;
    in a real process it must be one line naming the matching pair to install."""
    import subprocess
    import sys
    from pathlib import Path
    fake = tmp_path / "site" / "torchvision"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise RuntimeError('operator torchvision::nms does not exist')\n")
    path = f"{tmp_path / 'site'}{os.pathsep}{Path(__file__).resolve().parents[1]}"  # the broken one first
    result = subprocess.run([sys.executable, "-m", "cifarjax.data", "--dataset", "fake", "x"], capture_output=True,
                            text=True, env=dict(os.environ, PYTHONPATH=path, NO_ALBUMENTATIONS_UPDATE="1"))
    assert result.returncode != 0 and "Traceback" not in result.stderr
    line, = result.stderr.strip().splitlines()
    assert line.startswith("error: cannot import torchvision.datasets (RuntimeError: operator torchvision::nms")
    assert "fix: pip install 'torch==" in line and "--index-url https://download.pytorch.org/whl/cpu" in line


def test_the_fix_names_the_torchvision_built_for_the_installed_torch(monkeypatch):
    import importlib.metadata

    from cifarjax import torchlib
    versions = {"torch": "2.14.1+cpu", "torchvision": "0.28.0"}
    monkeypatch.setattr(importlib.metadata, "version", lambda name: versions[name])
    message = torchlib.broken_install("torchvision", AttributeError("x"))
    assert "not a matching pair (torch 2.14.1+cpu needs torchvision 0.29)" in message
    assert "fix: pip install 'torch==2.14.1' 'torchvision==0.29.*'" in message
    versions["torchvision"] = "0.29.1"
    assert "installed but broken" in torchlib.broken_install("torchvision", AttributeError("x"))


def test_entries_that_are_not_used_are_counted_and_named(image_folder, capsys):
    import os
    from cifarjax import data
    cat = image_folder / "train" / "cat"
    (cat / "broken.jpg").symlink_to(cat / "gone.jpg")
    (cat / "notes.txt").write_text("not an image")
    os.mkfifo(cat / "pipe.png")
    (image_folder / "train" / "README").write_text("beside the classes")
    dataset = load_dataset(image_folder)
    assert len(dataset.train) == 36  # 3 classes x 12 images: nothing else
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "4 entries in" in err and "are not used" in err and "broken.jpg" in err
    data.main([str(image_folder)])
    listed = json.loads(capsys.readouterr().out)["unused_entries"]
    assert sorted(os.path.basename(p) for p in listed) == ["README", "broken.jpg", "notes.txt", "pipe.png"]


def test_classes_selects_and_renumbers_in_the_order_given(image_folder):
    from cifarjax.data import select_classes
    full = load_dataset(image_folder)
    picked = load_dataset(image_folder, classes="frog,cat")
    assert picked.classes == ("frog", "cat") and len(picked.train) == 24 and len(picked.test) == 8
    for split, whole in ((picked.train, full.train), (picked.test, full.test)):
        np.testing.assert_array_equal(split.images[split.labels == 0], whole.images[whole.labels == 2])
        np.testing.assert_array_equal(split.images[split.labels == 1], whole.images[whole.labels == 0])
    assert select_classes(full, full.classes) is full
    for bad, message in (("cat,cow", "no class 'cow' in this data; its classes are cat,dog,frog"),
                         ("cat,cat", "a class is named twice"), ("cat", "a classifier needs 2 or more")):
        with pytest.raises(UserError, match=message):
            load_dataset(image_folder, classes=bad)


def test_the_content_digest_reads_every_byte_of_a_file_larger_than_its_buffer(tmp_path):
    path = tmp_path / "big.png"
    content = bytearray(np.random.default_rng(0).integers(0, 256, 3 * 65536 + 5, dtype=np.uint8).tobytes())
    path.write_bytes(content)
    before = data.sources.content_digest([path])
    content[-1] ^= 1
    path.write_bytes(content)
    assert data.sources.content_digest([path]) != before
    assert data.sources.content_digest([path], ["a"]) != data.sources.content_digest([path], ["b"])
