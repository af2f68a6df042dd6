"""Datasets decoded once into uint8 arrays and cached on disk; torchvision appears only at the edge.

Sources (`dataset=`):
* 'auto' (default): `data_dir` holding `cifar-10-batches-py`, or an ImageFolder tree
  (`DIR/train/<class>/*`, optionally `DIR/test/<class>/*`, or `DIR/<class>/*` as a train split);
  with no `data_dir`, CIFAR-10 downloaded by torchvision into the cache folder.
* 'cifar10': torchvision's CIFAR10, downloaded into `data_dir` (default: the cache folder) on first use.
* 'folder': an ImageFolder tree, as above.
* 'fake': torchvision's FakeData, for smoke runs without any data.

Every image becomes RGB at `size`x`size` (converted and resized if needed). The arrays are cached under
the cache folder (`cifarjax.files.cache_dir`), keyed by source, size and the files' names and contents (a SHA-256
of their bytes: files changed with their sizes and times kept are noticed); each cache file stores its key and is
rebuilt when it does not match. A cache that cannot be written or read
is skipped with a warning.

`python -m cifarjax.data DIR` prints the source, classes and per-split counts as one JSON object.
"""
from __future__ import annotations

import hashlib
import json
import os
import shlex
import tarfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
from PIL import Image

from cifarjax import sources, torchlib
from cifarjax.config import SOURCES
from cifarjax.errors import UserError, exit_on_user_error, user_error_from_os, warn
from cifarjax.files import atomic_write, best_effort, cache_dir
from cifarjax.flags import Parser

_CACHE_FORMAT = 3


@dataclass
class Split:
    """Images (or a backbone's features) and their labels. Construction checks they pair up: as many labels as
    rows, labels a 1-D integer array; `check_images` checks the images' own form."""
    images: np.ndarray  # (N, size, size, 3) uint8
    labels: np.ndarray  # (N,) int32

    def __post_init__(self):
        labels, images = self.labels, self.images
        if not hasattr(labels, "dtype") or labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
            raise UserError(f"a Split's labels must be a 1-D integer array of shape (N,); got "
                            f"{_form(labels)}")
        if not hasattr(images, "shape") or images.ndim < 1 or len(images) != len(labels):
            raise UserError(f"a Split needs as many labels as images: got {_form(images)} images and "
                            f"{len(labels)} labels")

    def __len__(self):
        return len(self.labels)

    def check_images(self, what: str = "images", allow_empty: bool = False) -> "Split":
        """Raise a UserError unless the images are uint8 of shape (N, H, W, 3) (and N > 0 unless allowed)."""
        images = self.images
        if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8 or 0 in images.shape[1:3]:
            raise UserError(f"{what} must be a uint8 array of shape (N, height, width, 3) (RGB, 0-255); got "
                            f"{_form(images)}")
        if not allow_empty and len(images) == 0:
            raise UserError(f"{what} are empty; give at least one image")
        return self

    def subset(self, indices) -> "Split":
        return Split(self.images[indices], self.labels[indices])


def check_pixels(images, what: str = "images") -> np.ndarray:
    """`images` unless they are not RGB pixels as the evaluation view reads them: an (N, H, W, 3) array of uint8
    [0, 255] or floats in [0, 1] (floats in [0, 255] would be read 255 times too bright); a UserError says what
    it got."""
    form = "an (N, height, width, 3) array of uint8 RGB pixels (0-255) or floats in [0, 1]"
    if not hasattr(images, "shape") or not hasattr(images, "dtype"):
        raise UserError(f"{what} must be {form}; got a {type(images).__name__} (np.stack a list of images)")
    if images.ndim != 4 or images.shape[-1] != 3 or 0 in images.shape[1:3] or not (
            images.dtype == np.uint8 or np.issubdtype(images.dtype, np.floating)):
        raise UserError(f"{what} must be {form}; got {_form(images)}")
    if images.dtype != np.uint8 and images.size:
        lo, hi = float(np.min(images)), float(np.max(images))
        if not 0 <= lo <= hi <= 1:  # NaN fails too
            raise UserError(f"{what} must be {form}; got {images.dtype} values in [{lo:g}, {hi:g}] (uint8 pixels: "
                            "pass them as uint8; floats: divide by 255)")
    return images


def _form(array) -> str:
    """An array's dtype and shape, for an error message."""
    return f"{array.dtype} {tuple(array.shape)}" if hasattr(array, "shape") else type(array).__name__


@dataclass
class Dataset:
    """A loaded dataset: its source, class names, and its train and test splits (None where it has none)."""
    source: str  # 'cifar10', 'cifar-10-batches-py', 'folder' or 'fake'
    classes: tuple
    train: Optional[Split]
    test: Optional[Split]


# ---------------------------------------------------------------------------------------------- splits

def split_indices(n: int, val_fraction: float = 0.2, seed: int = 0):
    """Seeded, deterministic (train, val) index arrays: a permutation cut at round(n * val_fraction)."""
    perm = np.random.default_rng(seed).permutation(n)
    n_val = int(round(n * val_fraction))
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


def balanced_indices(labels: np.ndarray, n: int, seed: int = 0) -> np.ndarray:
    """A seeded, class-balanced choice of n indices (sorted): n // classes per class, the remainder to the
    first classes; a class with fewer images gives all it has."""
    classes = np.unique(labels)
    rng = np.random.default_rng([seed, n])
    picks = []
    for i, c in enumerate(classes):
        members = np.flatnonzero(labels == c)
        k = n // len(classes) + (i < n % len(classes))
        picks.append(rng.permutation(members)[:k])
    return np.sort(np.concatenate(picks))


def train_val_split(dataset: Dataset, val_fraction: float = 0.2, seed: int = 0, subset: int = 0):
    """The original's 80/20 split of the training images: (train Split, val Split).

    With `subset` N, a seeded class-balanced N of the training part and N // 4 of the validation part.
    """
    if dataset.train is None or len(dataset.train) < 2:
        raise UserError("this dataset has no training images to split; give a folder with DIR/train/<class>/*")
    dataset.train.check_images("the dataset's training images")
    if isinstance(val_fraction, bool) or not isinstance(val_fraction, (int, float, np.floating)) \
            or not 0 < val_fraction < 1:
        raise UserError(f"val_fraction must be a number between 0 and 1, got {val_fraction!r}")
    for name, value in (("seed", seed), ("subset", subset)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not 0 <= value < 2**32:
            raise UserError(f"{name} must be an integer from 0 to {2**32 - 1}, got {value!r}")
    train_idx, val_idx = split_indices(len(dataset.train), val_fraction, seed)
    if not len(train_idx) or not len(val_idx):
        raise UserError(f"val_fraction {val_fraction} of {len(dataset.train)} images leaves an empty "
                        f"{'training' if not len(train_idx) else 'validation'} split; give more images or another "
                        "val_fraction")
    train, val = dataset.train.subset(train_idx), dataset.train.subset(val_idx)
    if subset:
        if subset >= len(train):
            warn(f"--subset {subset} is not less than the {len(train)} training images of this split; all of them "
                 f"are used")
        else:
            train = train.subset(balanced_indices(train.labels, subset, seed))
            val = val.subset(balanced_indices(val.labels, min(max(1, subset // 4), len(val)), seed + 1))
    return train, val


def select_classes(dataset: Dataset, classes) -> Dataset:
    """`dataset` restricted to the named `classes`, labels renumbered 0.. in the order given (train and test
    alike); the dataset itself when `classes` is empty or every class in the data's own order."""
    classes = tuple(c.strip() for c in classes.split(",") if c.strip()) if isinstance(classes, str) else \
        tuple(classes or ())
    if not classes or classes == tuple(dataset.classes):
        return dataset
    unknown = [c for c in classes if c not in dataset.classes]
    if unknown or len(set(classes)) != len(classes) or len(classes) < 2:
        problem = (f"no class {', '.join(map(repr, unknown))} in this data" if unknown else
                   "a class is named twice" if len(set(classes)) != len(classes) else "a classifier needs 2 or more")
        raise UserError(f"--classes {','.join(classes)}: {problem}; its classes are {','.join(dataset.classes)}")
    renumber = np.full(len(dataset.classes), -1, np.int32)
    renumber[[dataset.classes.index(c) for c in classes]] = np.arange(len(classes))

    def cut(split):
        if split is None:
            return None
        keep = np.flatnonzero(renumber[split.labels] >= 0)
        return Split(split.images[keep], renumber[split.labels[keep]])
    return Dataset(dataset.source, classes, cut(dataset.train), cut(dataset.test))


def fingerprint(dataset: Dataset) -> dict:
    """What a run's split depends on: the image counts and a SHA-256 of the classes and of every decoded image
    and label, in order. Equal for the same images in another folder; changed by any image added, removed,
    relabelled or altered."""
    h = hashlib.sha256(json.dumps(list(dataset.classes)).encode())
    counts = {}
    for name in ("train", "test"):
        split = getattr(dataset, name)
        if split is not None:
            counts[name] = len(split)
            h.update(f"|{name}|{split.images.shape}|".encode())
            h.update(np.ascontiguousarray(split.images).data)
            h.update(np.ascontiguousarray(split.labels, dtype=np.int64).data)
    return {"images": counts, "sha256": h.hexdigest()}


# ---------------------------------------------------------------------------------------------- sources

def _folder_splits(root: Path, unused: Optional[list] = None):
    """{'train': (classes, files), 'test': ...} for an ImageFolder tree rooted at `root` (`unused` collects the
    paths of entries that are not used)."""
    splits = {s: sources.class_files(root / s, unused) for s in ("train", "test") if (root / s).is_dir()}
    if not splits:
        nested = sorted(e.path for e in os.scandir(root) if e.is_dir() and os.path.isdir(os.path.join(e.path, "train")))
        if nested:  # the folder that holds the unpacked data, one level too high
            raise UserError(f"{root} holds no train/ folder, but {nested[0]} does: pass --data-dir {nested[0]}")
        splits = {"train": sources.class_files(root, unused)}
    return {s: v for s, v in splits.items() if v[1]}


def _relative(path: str, root: Path) -> str:
    """`path` (a file below `root`, as os.scandir joined it) relative to `root`: str(Path.relative_to), by string
    slicing (50,000 Path objects take seconds; the cache key must not change with the method)."""
    base = "" if str(root) == "." else os.path.join(str(root), "")  # Path(".") / "train" is "train"
    return path[len(base):] if path.startswith(base) else str(Path(path).relative_to(root))


def _load_folder(root: Path, size: int) -> Dataset:
    splits = _folder_splits(root)
    if not splits:
        raise UserError(f"no images found in {root}: expected {root}/train/<class>/*.jpg (and optionally "
                        f"{root}/test/<class>/*.jpg) with extensions {', '.join(sources.IMAGE_EXTENSIONS)}")
    class_lists = {s: tuple(v[0]) for s, v in splits.items()}
    if len(set(class_lists.values())) > 1:
        train, test = class_lists["train"], class_lists["test"]
        raise UserError(f"the train and test class folders in {root} disagree: only in train: "
                        f"{sorted(set(train) - set(test))}, only in test: {sorted(set(test) - set(train))}; "
                        "give both splits the same class folders")
    classes = next(iter(class_lists.values()))
    fingerprint = {s: sources.content_digest([f.path for f in v[1]], [_relative(f.path, root) for f in v[1]])
                   for s, v in splits.items()}

    def build():
        decoded = {s: Split(*sources.decode_files(v[1], size, f"decoding {s}")) for s, v in splits.items()}
        return Dataset("folder", classes, decoded.get("train"), decoded.get("test"))
    return _cached("folder", root, size, fingerprint, build)


def _load_cifar_batches(folder: Path, size: int) -> Dataset:
    classes = sources.cifar_classes(folder)

    def split(names):
        parts = [sources.read_cifar_batch(folder / n, len(classes)) for n in names]
        images = np.concatenate([p[0] for p in parts])
        return Split(_resize(images, size), np.concatenate([p[1] for p in parts]))
    return Dataset("cifar-10-batches-py", classes, split(sources.CIFAR_TRAIN_BATCHES), split(["test_batch"]))


def _resize(images: np.ndarray, size: int) -> np.ndarray:
    if images.shape[1:3] == (size, size):
        return np.ascontiguousarray(images)
    return np.stack([np.asarray(Image.fromarray(im).resize((size, size), Image.BILINEAR)) for im in images])


def _download_cifar10(root: Path) -> Path:
    try:
        CIFAR10 = torchlib.load("torchvision.datasets").CIFAR10
    except UserError as error:
        raise UserError(f"no --data-dir given, and CIFAR-10 cannot be downloaded: {error}; or pass --data-dir with "
                        f"a folder holding {sources.CIFAR_DIR} or an ImageFolder tree (DIR/train/<class>/*.jpg)"
                        ) from None
    try:
        root.mkdir(parents=True, exist_ok=True)
        CIFAR10(str(root), train=True, download=True)
    except Exception as error:  # noqa: BLE001 - network failures surface as many types
        raise UserError(f"could not download CIFAR-10 into {root} ({type(error).__name__}: {error}); "
                        "on a machine without network, pass --data-dir with a folder holding "
                        f"{sources.CIFAR_DIR} or an ImageFolder tree (DIR/train/<class>/*.jpg)") from None
    return root / sources.CIFAR_DIR


def _load_fake(size: int, seed: int = 0, n_train: int = 1000, n_test: int = 200) -> Dataset:
    FakeData = torchlib.load("torchvision.datasets").FakeData

    def split(n, offset):
        fake = FakeData(size=n, image_size=(3, size, size), num_classes=10, random_offset=offset)
        items = [fake[i] for i in range(n)]  # each item draws its image and label afresh: draw once
        return Split(np.stack([np.asarray(image, np.uint8) for image, _ in items]),
                     np.array([int(label) for _, label in items], np.int32))

    return Dataset("fake", tuple(f"class{i}" for i in range(10)), split(n_train, seed), split(n_test, seed + n_train))


# ---------------------------------------------------------------------------------------------- cache

def _cache_key(kind: str, root: Path, size: int, fingerprint) -> str:
    blob = json.dumps([_CACHE_FORMAT, kind, str(root.resolve()), size, fingerprint])
    return hashlib.sha256(blob.encode()).hexdigest()


def _save(dataset: Dataset, path: Path, key: str) -> None:
    arrays = {"key": np.array(key), "source": np.array(dataset.source), "classes": np.array(dataset.classes, str)}
    for name in ("train", "test"):
        split = getattr(dataset, name)
        if split is not None:
            arrays[f"{name}_images"], arrays[f"{name}_labels"] = split.images, split.labels
    with atomic_write(path, "wb") as f:
        np.savez(f, **arrays)


def _load(path: Path, key: str, size: int) -> Optional[Dataset]:
    """The cached dataset, or None when the file's stored key or contents do not match."""
    with np.load(path) as z:
        if "key" not in z.files or str(z["key"]) != key:
            return None
        classes = tuple(str(c) for c in z["classes"])
        splits = {}
        for n in ("train", "test"):
            if f"{n}_images" not in z.files:
                splits[n] = None
                continue
            split = Split(z[f"{n}_images"], z[f"{n}_labels"])
            if (split.images.dtype != np.uint8 or split.images.shape[1:] != (size, size, 3)
                    or len(split.images) != len(split.labels) or
                    (len(split) and not 0 <= split.labels.min() <= split.labels.max() < len(classes))):
                return None
            splits[n] = split
        return Dataset(str(z["source"]), classes, splits["train"], splits["test"])


def _cached(kind: str, root: Path, size: int, fingerprint, build) -> Dataset:
    key = _cache_key(kind, root, size, fingerprint)
    path = cache_dir() / "datasets" / f"{kind}-{key[:20]}.npz"
    if path.is_file():
        try:
            dataset = _load(path, key, size)
        except Exception:  # noqa: BLE001 - a damaged cache entry is rebuilt
            dataset = None
        if dataset is not None:
            return dataset
        warn(f"cached arrays {path} are damaged or do not match their source; decoding the images again")
    dataset = build()
    best_effort(lambda: _save(dataset, path, key), f"writing the dataset cache {path}")
    return dataset


def _batches_fingerprint(folder: Path):
    names = sorted(e.name for e in os.scandir(folder) if e.is_file())
    return sources.content_digest([folder / n for n in names], names)


# ---------------------------------------------------------------------------------------------- entry

def _check_size(size: int) -> None:
    if not isinstance(size, int) or not 8 <= size <= 1024:
        raise UserError(f"image size must be an integer between 8 and 1024, got {size!r}")


def _load_cifar(folder: Path, size: int) -> Dataset:
    return _cached("cifar", folder, size, _batches_fingerprint(folder), lambda: _load_cifar_batches(folder, size))


def load_dataset(data_dir=None, dataset: str = "auto", size: int = 32, classes=()) -> Dataset:
    """Load a dataset as uint8 arrays (see the module docstring for the sources); cached after the first load.
    `classes`: only these class names, relabelled in that order (`select_classes`)."""
    return select_classes(_load_dataset(data_dir, dataset, size), classes)


def _load_dataset(data_dir, dataset: str, size: int) -> Dataset:
    _check_size(size)
    if dataset not in SOURCES:
        raise UserError(f"dataset must be one of {', '.join(SOURCES)}, got {dataset!r}")
    if dataset == "fake":
        return _load_fake(size)
    if data_dir is not None and not str(data_dir).strip():
        raise UserError("--data-dir is empty; pass the folder that holds your images")
    root = Path(data_dir).expanduser() if data_dir is not None else None
    if dataset == "folder" and root is None:
        raise UserError("--dataset folder needs --data-dir DIR (a folder with DIR/train/<class>/*.jpg)")
    try:
        if dataset == "cifar10" or (dataset == "auto" and root is None):
            root = root or cache_dir() / "cifar10"
            folder = root if root.name == sources.CIFAR_DIR else root / sources.CIFAR_DIR
            return _load_cifar(folder if (folder / "batches.meta").is_file() else _download_cifar10(root), size)
        try:
            root.stat()  # not exists(), which says False for a symbolic link loop: that is an OSError below
        except FileNotFoundError:
            raise UserError(f"data folder {root} does not exist; pass --data-dir with a folder holding "
                            f"{sources.CIFAR_DIR} or DIR/train/<class>/*.jpg") from None
        if not root.is_dir():
            raise UserError(_archive_advice(root) or f"{root} is a file, not a data folder; pass the folder that "
                            "holds it")
        if dataset == "auto":
            for folder in (root, root / sources.CIFAR_DIR):
                if folder.name == sources.CIFAR_DIR and folder.is_dir():
                    return _load_cifar(folder, size)
        return _load_folder(root, size)
    except OSError as error:
        raise user_error_from_os(error, f"cannot read the data in {root}") from None


ARCHIVES = {".tar.gz": "tar xzf", ".tgz": "tar xzf", ".tar": "tar xf", ".tar.bz2": "tar xjf", ".tar.xz": "tar xJf"}


def _archive_advice(path: Path) -> Optional[str]:
    """For an archive passed as the data folder: the message saying how to unpack it (None for other files)."""
    name = path.name.lower()
    if name.endswith(".zip"):
        unpack, inner = f"unzip {shlex.quote(str(path))} -d DIR", _first_member(path, "zip")
    else:
        command = next((c for ext, c in ARCHIVES.items() if name.endswith(ext)), None)
        if command is None:
            return None
        unpack, inner = f"{command} {shlex.quote(str(path))} -C DIR", _first_member(path, "tar")
    return (f"{path} is an archive; unpack it first ({unpack}), then pass --data-dir "
            f"{'DIR/' + inner if inner else 'DIR (or the folder it unpacked into)'}")


def _first_member(path: Path, kind: str) -> Optional[str]:
    """The top-level folder an archive unpacks into, from its first entry (None if unknown)."""
    try:
        if kind == "zip":
            with zipfile.ZipFile(path) as z:
                name = next(iter(z.namelist()), "")
                is_dir = name.endswith("/")
        else:
            with tarfile.open(path) as t:
                member = t.next()
                name, is_dir = (member.name, member.isdir()) if member is not None else ("", False)
    except Exception:  # noqa: BLE001 - a damaged archive still gets the unpacking advice
        return None
    parts = [p for p in name.split("/") if p not in ("", ".")]
    return parts[0] if parts and (is_dir or len(parts) > 1) else None


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
    parser = Parser(prog="python -m cifarjax.data", description=describe.__doc__)
    parser.add_argument("data_dir", help="a folder holding cifar-10-batches-py or DIR/train/<class>/* images")
    parser.add_argument("--dataset", choices=SOURCES, default="auto", help="data source (default: auto)")
    parser.add_argument("--decode-size", type=int, default=32, help="decode every image at this size (default: 32)")
    parser.add_argument("--val-fraction", type=float, default=0.2, help="validation fraction (default: 0.2)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the train/validation split (default: 0)")
    parser.add_argument("--classes", default="", metavar="NAME,NAME",
                        help="only these classes, relabelled in this order (default: all)")
    args = parser.parse_args(argv)
    described = describe(load_dataset(args.data_dir, args.dataset, args.decode_size, args.classes), args.val_fraction,
                         args.seed)
    unused = []
    if described["source"] == "folder":
        _folder_splits(Path(args.data_dir).expanduser(), unused)
    print(json.dumps({**described, "unused_entries": unused}))


if __name__ == "__main__":
    main()
