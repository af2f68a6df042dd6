"""Datasets decoded once into uint8 arrays and cached on disk; torchvision appears only at the edge.

Sources (`dataset=`):
* 'auto' (default): `data_dir` holding `cifar-10-batches-py`, or an ImageFolder tree
  (`DIR/train/<class>/*`, optionally `DIR/test/<class>/*`, or `DIR/<class>/*` as a train split);
  with no `data_dir`, CIFAR-10 downloaded by torchvision into the cache folder.
* 'cifar10': torchvision's CIFAR10, downloaded into `data_dir` (default: the cache folder) on first use.
* 'folder': an ImageFolder tree, as above.
* 'fake': torchvision's FakeData, for smoke runs without any data.

Every image becomes RGB at `size`x`size` (converted and resized if needed). The arrays are cached under
`$CIFARJAX_CACHE` (default ~/.cache/cifarjax), keyed by source, size and the files' names, sizes and times,
so a second load reads one .npz file.

`python -m cifarjax.data DIR` prints the source, classes and per-split counts as one JSON object.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import pickle
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from cifarjax.errors import UserError, exit_on_user_error

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
SOURCES = ("auto", "cifar10", "folder", "fake")
_CACHE_FORMAT = 1
_CIFAR_DIR = "cifar-10-batches-py"


@dataclass
class Split:
    images: np.ndarray  # (N, size, size, 3) uint8
    labels: np.ndarray  # (N,) int32

    def __len__(self):
        return len(self.labels)

    def subset(self, indices) -> "Split":
        return Split(self.images[indices], self.labels[indices])


@dataclass
class Dataset:
    source: str  # 'cifar10', 'cifar-10-batches-py', 'folder' or 'fake'
    classes: tuple
    train: Optional[Split]
    test: Optional[Split]


def default_cache_dir() -> Path:
    return Path(os.environ.get("CIFARJAX_CACHE", Path.home() / ".cache" / "cifarjax"))


# ---------------------------------------------------------------------------------------------- splits

def split_indices(n: int, val_fraction: float = 0.2, seed: int = 0):
    """Seeded, deterministic (train, val) index arrays: a permutation cut at round(n * val_fraction)."""
    perm = np.random.default_rng(seed).permutation(n)
    n_val = int(round(n * val_fraction))
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


def train_val_split(dataset: Dataset, val_fraction: float = 0.2, seed: int = 0):
    """The original's 80/20 split of the training images: (train Split, val Split)."""
    if dataset.train is None or len(dataset.train) < 2:
        raise UserError("this dataset has no training images to split; give a folder with DIR/train/<class>/*")
    train_idx, val_idx = split_indices(len(dataset.train), val_fraction, seed)
    return dataset.train.subset(train_idx), dataset.train.subset(val_idx)


# ---------------------------------------------------------------------------------------------- sources

def _image_files(split_dir: Path):
    classes = sorted(e.name for e in os.scandir(split_dir) if e.is_dir() and not e.name.startswith("."))
    files = []
    for label, name in enumerate(classes):
        for entry in sorted(os.scandir(split_dir / name), key=lambda e: e.name):
            if entry.is_file() and entry.name.lower().endswith(IMAGE_EXTENSIONS):
                st = entry.stat()
                files.append((Path(entry.path), label, st.st_size, st.st_mtime_ns))
    return classes, files


def _folder_splits(root: Path):
    """{'train': (classes, files), 'test': ...} for an ImageFolder tree rooted at `root`."""
    splits = {s: _image_files(root / s) for s in ("train", "test") if (root / s).is_dir()}
    if not splits:
        splits = {"train": _image_files(root)}
    return {s: v for s, v in splits.items() if v[1]}


def _decode_one(path: Path, size: int) -> np.ndarray:
    from PIL import Image
    try:
        with Image.open(path) as image:
            image = image.convert("RGB")
            if image.size != (size, size):
                image = image.resize((size, size), Image.BILINEAR)
            return np.asarray(image, dtype=np.uint8)
    except Exception as error:  # noqa: BLE001 - PIL raises many types for a bad file
        raise UserError(f"cannot read image {path} ({type(error).__name__}: {error}); "
                        "delete or replace that file and run again") from None


def _decode_files(files, size: int, desc: str) -> Split:
    from tqdm import tqdm
    images = np.empty((len(files), size, size, 3), np.uint8)

    def work(i):
        images[i] = _decode_one(files[i][0], size)

    with ThreadPoolExecutor(max(2, os.cpu_count() or 1)) as pool:
        for _ in tqdm(pool.map(work, range(len(files))), total=len(files), desc=desc, unit="img",
                      leave=False, mininterval=1.0, disable=len(files) < 2000):
            pass
    return Split(images, np.array([f[1] for f in files], np.int32))


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """CIFAR-10's python batches hold dicts of lists and numpy arrays; nothing else may be unpickled."""
    ALLOWED = {("numpy", "ndarray"), ("numpy", "dtype")} | {
        (module, name) for module in ("numpy.core.multiarray", "numpy._core.multiarray")
        for name in ("_reconstruct", "scalar")}

    def find_class(self, module, name):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def _read_cifar_batch(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            return _NumpyOnlyUnpickler(f, encoding="latin1").load()
    except FileNotFoundError:
        raise UserError(f"{path} is missing: a {_CIFAR_DIR} folder needs data_batch_1..5, test_batch and "
                        "batches.meta; download CIFAR-10 again (python version)") from None
    except Exception as error:  # noqa: BLE001
        raise UserError(f"{path} is not a CIFAR-10 python batch ({type(error).__name__}); "
                        "download CIFAR-10 again (python version)") from None


def _cifar_split(folder: Path, names: Sequence[str], size: int) -> Split:
    batches = [_read_cifar_batch(folder / n) for n in names]
    images = np.concatenate([np.asarray(b["data"], np.uint8).reshape(-1, 3, 32, 32) for b in batches])
    images = images.transpose(0, 2, 3, 1)
    labels = np.concatenate([np.asarray(b["labels"], np.int32) for b in batches])
    return Split(_resize(images, size), labels)


def _resize(images: np.ndarray, size: int) -> np.ndarray:
    if images.shape[1:3] == (size, size):
        return np.ascontiguousarray(images)
    from PIL import Image
    return np.stack([np.asarray(Image.fromarray(im).resize((size, size), Image.BILINEAR)) for im in images])


def _load_cifar_batches(folder: Path, size: int) -> Dataset:
    meta = _read_cifar_batch(folder / "batches.meta")
    train = _cifar_split(folder, [f"data_batch_{i}" for i in range(1, 6)], size)
    test = _cifar_split(folder, ["test_batch"], size)
    return Dataset("cifar-10-batches-py", tuple(meta["label_names"]), train, test)


def _download_cifar10(root: Path) -> Path:
    from torchvision.datasets import CIFAR10
    root.mkdir(parents=True, exist_ok=True)
    try:
        CIFAR10(str(root), train=True, download=True)
    except Exception as error:  # noqa: BLE001 - network failures surface as many types
        raise UserError(f"could not download CIFAR-10 into {root} ({type(error).__name__}: {error}); "
                        "on a machine without network, pass --data-dir with a folder holding "
                        f"{_CIFAR_DIR} or an ImageFolder tree (DIR/train/<class>/*.jpg)") from None
    return root / _CIFAR_DIR


def _load_fake(size: int, seed: int = 0, n_train: int = 1000, n_test: int = 200) -> Dataset:
    from torchvision.datasets import FakeData

    def split(n, offset):
        fake = FakeData(size=n, image_size=(3, size, size), num_classes=10, random_offset=offset)
        images = np.stack([np.asarray(fake[i][0], np.uint8) for i in range(n)])
        return Split(images, np.array([int(fake[i][1]) for i in range(n)], np.int32))

    return Dataset("fake", tuple(f"class{i}" for i in range(10)), split(n_train, seed), split(n_test, seed + n_train))


# ---------------------------------------------------------------------------------------------- cache

def _cache_path(kind: str, root: Path, size: int, fingerprint) -> Path:
    blob = json.dumps([_CACHE_FORMAT, kind, str(root.resolve()), size, fingerprint])
    return default_cache_dir() / "datasets" / f"{kind}-{hashlib.sha256(blob.encode()).hexdigest()[:20]}.npz"


def _save(dataset: Dataset, path: Path) -> None:
    arrays = {"source": np.array(dataset.source), "classes": np.array(dataset.classes, dtype=str)}
    for name in ("train", "test"):
        split = getattr(dataset, name)
        if split is not None:
            arrays[f"{name}_images"], arrays[f"{name}_labels"] = split.images, split.labels
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, path)


def _load(path: Path) -> Dataset:
    with np.load(path) as z:
        splits = {n: Split(z[f"{n}_images"], z[f"{n}_labels"]) if f"{n}_images" in z.files else None
                  for n in ("train", "test")}
        return Dataset(str(z["source"]), tuple(str(c) for c in z["classes"]), splits["train"], splits["test"])


def _cached(kind: str, root: Path, size: int, fingerprint, build) -> Dataset:
    path = _cache_path(kind, root, size, fingerprint)
    if path.is_file():
        try:
            return _load(path)
        except Exception:  # noqa: BLE001 - a damaged cache entry is rebuilt
            path.unlink(missing_ok=True)
    dataset = build()
    _save(dataset, path)
    return dataset


def _stat_fingerprint(folder: Path):
    return sorted((e.name, e.stat().st_size, e.stat().st_mtime_ns) for e in os.scandir(folder) if e.is_file())


# ---------------------------------------------------------------------------------------------- entry

def _check_size(size: int) -> None:
    if not isinstance(size, int) or not 8 <= size <= 1024:
        raise UserError(f"image size must be an integer between 8 and 1024, got {size!r}")


def _load_folder(root: Path, size: int) -> Dataset:
    splits = _folder_splits(root)
    if not splits:
        raise UserError(f"no images found in {root}: expected {root}/train/<class>/*.jpg (and optionally "
                        f"{root}/test/<class>/*.jpg) with extensions {', '.join(IMAGE_EXTENSIONS)}")
    class_lists = {s: tuple(v[0]) for s, v in splits.items()}
    if len(set(class_lists.values())) > 1:
        train, test = class_lists["train"], class_lists["test"]
        raise UserError(f"the train and test class folders in {root} disagree: only in train: "
                        f"{sorted(set(train) - set(test))}, only in test: {sorted(set(test) - set(train))}; "
                        "give both splits the same class folders")
    classes = next(iter(class_lists.values()))
    fingerprint = {s: [(str(p.relative_to(root)), n, t) for p, _, n, t in v[1]] for s, v in splits.items()}

    def build():
        decoded = {s: _decode_files(v[1], size, f"decoding {s}") for s, v in splits.items()}
        return Dataset("folder", classes, decoded.get("train"), decoded.get("test"))
    return _cached("folder", root, size, fingerprint, build)


def load_dataset(data_dir=None, dataset: str = "auto", size: int = 32) -> Dataset:
    """Load a dataset as uint8 arrays (see the module docstring for the sources); cached after the first load."""
    _check_size(size)
    if dataset not in SOURCES:
        raise UserError(f"dataset must be one of {', '.join(SOURCES)}, got {dataset!r}")
    if dataset == "fake":
        return _load_fake(size)
    root = Path(data_dir).expanduser() if data_dir is not None else None
    if dataset == "folder" and root is None:
        raise UserError("--dataset folder needs --data-dir DIR (a folder with DIR/train/<class>/*.jpg)")
    if dataset == "cifar10" or (dataset == "auto" and root is None):
        root = root or default_cache_dir() / "cifar10"
        folder = root if root.name == _CIFAR_DIR else root / _CIFAR_DIR
        if not (folder / "batches.meta").is_file():
            folder = _download_cifar10(root)
        return _cached("cifar", folder, size, _stat_fingerprint(folder), lambda: _load_cifar_batches(folder, size))
    if not root.exists():
        raise UserError(f"data folder {root} does not exist; pass --data-dir with a folder holding "
                        f"{_CIFAR_DIR} or DIR/train/<class>/*.jpg")
    if not root.is_dir():
        raise UserError(f"{root} is a file, not a data folder; pass the folder that holds it")
    for folder in (root, root / _CIFAR_DIR):
        if dataset == "auto" and folder.name == _CIFAR_DIR and folder.is_dir():
            return _cached("cifar", folder, size, _stat_fingerprint(folder),
                           lambda f=folder: _load_cifar_batches(f, size))
    return _load_folder(root, size)


def describe(dataset: Dataset, val_fraction: float = 0.2, seed: int = 0) -> dict:
    """Source, classes and per-split image counts (train/val from the seeded split; test if present)."""
    def counts(labels):
        per_class = np.bincount(labels, minlength=len(dataset.classes)) if len(labels) else np.zeros(0, int)
        return {"n": int(len(labels)), "per_class": {c: int(n) for c, n in zip(dataset.classes, per_class)}}

    splits = {}
    if dataset.train is not None:
        splits["train_folder"] = counts(dataset.train.labels)
        if len(dataset.train) >= 2:
            train, val = train_val_split(dataset, val_fraction, seed)
            splits["train"], splits["val"] = counts(train.labels), counts(val.labels)
    if dataset.test is not None:
        splits["test"] = counts(dataset.test.labels)
    return {"source": dataset.source, "classes": list(dataset.classes), "splits": splits}


@exit_on_user_error
def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m cifarjax.data", description=describe.__doc__)
    parser.add_argument("data_dir", help="a folder holding cifar-10-batches-py or DIR/train/<class>/* images")
    parser.add_argument("--dataset", choices=SOURCES, default="auto")
    parser.add_argument("--img-size", type=int, default=32, help="decode every image at this size (default 32)")
    parser.add_argument("--val-fraction", type=float, default=0.2)
    parser.add_argument("--seed", type=int, default=0, help="seed of the train/validation split")
    args = parser.parse_args(argv)
    print(json.dumps(describe(load_dataset(args.data_dir, args.dataset, args.img_size), args.val_fraction,
                              args.seed)))


if __name__ == "__main__":
    main()
