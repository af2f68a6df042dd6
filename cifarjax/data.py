"""Datasets decoded once into uint8 RGB arrays at `size`x`size` (cached, keyed by a SHA-256 of the files' names and
bytes), split with a seed and cut into index batches for the devices. Sources (`dataset=`): 'auto' reads `data_dir`
holding `cifar-10-batches-py` or an ImageFolder tree (`DIR/train/<class>/*`, optionally `DIR/test/<class>/*`, or
`DIR/<class>/*` as a train split), without `data_dir` downloads CIFAR-10; 'cifar10' downloads it into `data_dir`;
'folder' reads an ImageFolder tree; 'fake' is torchvision's FakeData. The cache: `runs.cache_dir` ($CIFARJAX_CACHE).
`python -m cifarjax.data DIR` prints the source, classes and per-split counts as one JSON object."""
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

from cifarjax import sources, torchlib
from cifarjax.config import SOURCES
from cifarjax.errors import UserError, best_effort, exit_on_user_error, user_error_from_os, warn
from cifarjax.runs import atomic_write, cache_dir
from cifarjax.flags import Parser

_CACHE_FORMAT = 3
_SPLITS = ("train", "test")


@dataclass
class Split:
    """Images (or a backbone's features) and their labels, checked to pair up; `check_images` checks the images."""
    images: np.ndarray  # (N, size, size, 3) uint8
    labels: np.ndarray  # (N,) int32

    def __post_init__(self):
        labels, images = self.labels, self.images
        if not hasattr(labels, "dtype") or labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
            raise UserError(f"a Split's labels must be a 1-D integer array of shape (N,); got {_form(labels)}")
        if not hasattr(images, "shape") or images.ndim < 1 or len(images) != len(labels):
            raise UserError(f"a Split needs as many labels as images: got {_form(images)} images and "
                            f"{len(labels)} labels")

    def __len__(self):
        return len(self.labels)

    def check_images(self, what: str = "images", allow_empty: bool = False) -> "Split":
        """Raise a UserError unless the images are uint8 (N, H, W, 3), N > 0 unless allowed."""
        check_pixels(self.images, what, floats=False)
        if not allow_empty and len(self.images) == 0:
            raise UserError(f"{what} are empty; give at least one image")
        return self

    def subset(self, indices) -> "Split":
        return Split(self.images[indices], self.labels[indices])


def check_pixels(images, what: str = "images", floats: bool = True) -> None:
    """A UserError saying why unless `images` are (N, H, W, 3) uint8 or, with `floats`, in [0, 1] (not [0, 255])."""
    form = ("an (N, height, width, 3) array of uint8 RGB pixels (0-255) or floats in [0, 1]" if floats else
            "a uint8 array of shape (N, height, width, 3) (RGB, 0-255)")
    if not hasattr(images, "shape") or not hasattr(images, "dtype"):
        raise UserError(f"{what} must be {form}; got a {type(images).__name__} (np.stack a list of images)")
    if images.ndim != 4 or images.shape[-1] != 3 or 0 in images.shape[1:3] or not (
            images.dtype == np.uint8 or floats and np.issubdtype(images.dtype, np.floating)):
        raise UserError(f"{what} must be {form}; got {_form(images)}")
    if images.dtype != np.uint8 and images.size:
        lo, hi = float(np.min(images)), float(np.max(images))
        if not 0 <= lo <= hi <= 1:  # NaN fails too
            raise UserError(f"{what} must be {form}; got {images.dtype} values in [{lo:g}, {hi:g}] (uint8 pixels: "
                            "pass them as uint8; floats: divide by 255)")


def _form(array) -> str:
    return f"{array.dtype} {tuple(array.shape)}" if hasattr(array, "shape") else type(array).__name__


@dataclass
class Dataset:
    """A loaded dataset: its source, class names, and its train and test splits (None where it has none)."""
    source: str  # 'cifar10', 'cifar-10-batches-py', 'folder' or 'fake'
    classes: tuple
    train: Optional[Split]
    test: Optional[Split]

    def splits(self) -> dict:
        """{'train': Split, 'test': Split}, without the splits it lacks."""
        return {name: getattr(self, name) for name in _SPLITS if getattr(self, name) is not None}


def split_indices(n: int, val_fraction: float = 0.2, seed: int = 0):
    """Seeded (train, val) index arrays, sorted: a permutation cut at round(n * val_fraction)."""
    perm = np.random.default_rng(seed).permutation(n)
    n_val = int(round(n * val_fraction))
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


def _balanced(split: Split, n: int, seed: int) -> Split:
    """A seeded, class-balanced n of `split`: n // classes per class, the remainder to the first classes."""
    classes = np.unique(split.labels)
    rng = np.random.default_rng([seed, n])
    picks = [rng.permutation(np.flatnonzero(split.labels == c))[:n // len(classes) + (i < n % len(classes))]
             for i, c in enumerate(classes)]
    return split.subset(np.sort(np.concatenate(picks)))


def train_val_split(dataset: Dataset, val_fraction: float = 0.2, seed: int = 0, subset: int = 0):
    """(train, val): the original's seeded 80/20 split; `subset` N keeps a seeded, class-balanced N of the training
    part and N // 4 of the validation part."""
    if dataset.train is None or len(dataset.train) < 2:
        raise UserError("this dataset has no training images to split; give a folder with DIR/train/<class>/*")
    dataset.train.check_images("the dataset's training images")
    if isinstance(val_fraction, bool) or not isinstance(val_fraction, (int, float, np.floating)) \
            or not 0 < val_fraction < 1:
        raise UserError(f"val_fraction must be a number between 0 and 1, got {val_fraction!r}")
    for name, value in (("seed", seed), ("subset", subset)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not 0 <= value < 2**32:
            raise UserError(f"{name} must be an integer from 0 to {2**32 - 1}, got {value!r}")
    train, val = (dataset.train.subset(i) for i in split_indices(len(dataset.train), val_fraction, seed))
    if not len(train) or not len(val):
        raise UserError(f"val_fraction {val_fraction} of {len(dataset.train)} images leaves an empty "
                        f"{'training' if not len(train) else 'validation'} split; give more images or another "
                        "val_fraction")
    if subset and subset >= len(train):
        warn(f"--subset {subset} is not less than the {len(train)} training images of this split; all of them are "
             "used")
    elif subset:
        train, val = _balanced(train, subset, seed), _balanced(val, min(max(1, subset // 4), len(val)), seed + 1)
    return train, val


def per_device(batch_size: int, n_devices: int) -> int:
    """The per-device share of a global batch; the batch must split evenly."""
    if batch_size < n_devices or batch_size % n_devices:
        raise UserError(f"batch size {batch_size} does not split evenly over {n_devices} devices; "
                        f"use a multiple of {n_devices}")
    return batch_size // n_devices


def train_indices(n: int, batch_size: int, n_devices: int, seed: int, epoch: int) -> np.ndarray:
    """One epoch's shuffled (steps, devices, per_device) indices, a function of (seed, epoch) alone so resumed runs
    repeat it; the last partial batch is dropped. The images stay on the devices: a step receives its indices."""
    b, steps = per_device(batch_size, n_devices), n // batch_size
    if steps == 0:
        raise UserError(f"batch size {batch_size} is larger than the {n} training images; use a smaller batch")
    order = np.random.default_rng([seed, epoch]).permutation(n).astype(np.int32)
    return order[:steps * batch_size].reshape(steps, n_devices, b)


def eval_indices(n: int, batch_size: int, n_devices: int):
    """(indices, mask) covering each example once, the tail padded (index 0, mask False); small sets, small batches."""
    b = max(1, min(batch_size, -(-n // n_devices) * n_devices) // n_devices)
    total = -(-n // (b * n_devices)) * b * n_devices
    mask = np.arange(total) < n
    return (np.arange(total, dtype=np.int32) * mask).reshape(-1, n_devices, b), mask.reshape(-1, n_devices, b)


def select_classes(dataset: Dataset, classes) -> Dataset:
    """`dataset` restricted to `classes` (names, or one comma-separated string), relabelled 0.. in that order."""
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
        keep = np.flatnonzero(renumber[split.labels] >= 0)
        return Split(split.images[keep], renumber[split.labels[keep]])
    return Dataset(dataset.source, classes, *(None if s is None else cut(s) for s in (dataset.train, dataset.test)))


def fingerprint(dataset: Dataset) -> dict:
    """Image counts and a SHA-256 of the classes and decoded images and labels in order (not where they are)."""
    h = hashlib.sha256(json.dumps(list(dataset.classes)).encode())
    counts = {}
    for name, split in dataset.splits().items():
        counts[name] = len(split)
        h.update(f"|{name}|{split.images.shape}|".encode())
        h.update(np.ascontiguousarray(split.images).data)
        h.update(np.ascontiguousarray(split.labels, dtype=np.int64).data)
    return {"images": counts, "sha256": h.hexdigest()}


def _folder_splits(root: Path, unused: Optional[list] = None):
    """{'train': (classes, paths, labels), 'test': ...} of an ImageFolder tree (`unused` collects entries not used)."""
    splits = {s: sources.class_files(root / s, unused) for s in _SPLITS if (root / s).is_dir()}
    if not splits:
        nested = sorted(e.path for e in os.scandir(root) if e.is_dir() and os.path.isdir(os.path.join(e.path, "train")))
        if nested:  # the folder that holds the unpacked data, one level too high
            raise UserError(f"{root} holds no train/ folder, but {nested[0]} does: pass --data-dir {nested[0]}")
        splits = {"train": sources.class_files(root, unused)}
    return {s: v for s, v in splits.items() if v[1]}


def _load_folder(root: Path, size: int) -> Dataset:
    splits = _folder_splits(root)
    if not splits:
        raise UserError(f"no images found in {root}: expected {root}/train/<class>/*.jpg (and optionally "
                        f"{root}/test/<class>/*.jpg) with extensions {', '.join(sources.IMAGE_EXTENSIONS)}")
    classes = {s: tuple(v[0]) for s, v in splits.items()}
    if len(set(classes.values())) > 1:
        train, test = classes["train"], classes["test"]
        raise UserError(f"the train and test class folders in {root} disagree: only in train: "
                        f"{sorted(set(train) - set(test))}, only in test: {sorted(set(test) - set(train))}; "
                        "give both splits the same class folders")
    # names relative to root by string slicing (50,000 Paths take seconds): str(Path(path).relative_to(root))
    base = "" if str(root) == "." else os.path.join(str(root), "")  # Path(".") / "train" is "train"
    digests = {s: sources.content_digest(paths, [p[len(base):] for p in paths]) for s, (_, paths, _) in splits.items()}

    def build():
        decoded = {s: Split(sources.decode_files(paths, size, f"decoding {s}")[0], np.array(labels, np.int32))
                   for s, (_, paths, labels) in splits.items()}
        return Dataset("folder", classes[next(iter(splits))], decoded.get("train"), decoded.get("test"))
    return _cached("folder", root, size, digests, build)


def _load_cifar(folder: Path, size: int) -> Dataset:
    names = sorted(e.name for e in os.scandir(folder) if e.is_file())

    def build():
        classes, train, test = sources.read_cifar(folder, size)
        return Dataset("cifar-10-batches-py", classes, Split(*train), Split(*test))
    return _cached("cifar", folder, size, sources.content_digest([folder / n for n in names], names), build)


def _download_cifar10(root: Path) -> Path:
    elsewhere = (f"pass --data-dir with a folder holding {sources.CIFAR_DIR} or an ImageFolder tree "
                 "(DIR/train/<class>/*.jpg)")
    try:
        CIFAR10 = torchlib.load("torchvision.datasets").CIFAR10
    except UserError as error:
        raise UserError(f"no --data-dir given, and CIFAR-10 cannot be downloaded: {error}; or {elsewhere}") from None
    try:
        root.mkdir(parents=True, exist_ok=True)
        CIFAR10(str(root), train=True, download=True)
    except Exception as error:  # noqa: BLE001 - network failures surface as many types
        raise UserError(f"could not download CIFAR-10 into {root} ({type(error).__name__}: {error}); "
                        f"on a machine without network, {elsewhere}") from None
    return root / sources.CIFAR_DIR


def _load_fake(size: int) -> Dataset:
    FakeData = torchlib.load("torchvision.datasets").FakeData

    def split(n, offset):
        fake = FakeData(size=n, image_size=(3, size, size), num_classes=10, random_offset=offset)
        items = [fake[i] for i in range(n)]  # each item draws its image and label afresh: draw once
        return Split(np.stack([np.asarray(image, np.uint8) for image, _ in items]),
                     np.array([int(label) for _, label in items], np.int32))
    return Dataset("fake", tuple(f"class{i}" for i in range(10)), split(1000, 0), split(200, 1000))


def _cached(kind: str, root: Path, size: int, fingerprint, build) -> Dataset:
    """`build()`'s dataset, kept in the cache folder under a key of its source, size and `fingerprint`; an entry that
    is damaged or does not match is decoded again, and one that cannot be written is skipped with a warning."""
    key = hashlib.sha256(json.dumps([_CACHE_FORMAT, kind, str(root.resolve()), size, fingerprint]).encode()).hexdigest()
    path = cache_dir() / "datasets" / f"{kind}-{key[:20]}.npz"
    if path.is_file():
        try:
            with np.load(path) as z:
                stale = str(z["key"]) != key
                dataset = Dataset(str(z["source"]), tuple(str(c) for c in z["classes"]), *(
                    Split(z[f"{n}_images"], z[f"{n}_labels"]) if f"{n}_images" in z.files else None for n in _SPLITS))
            for split in dataset.splits().values():
                stale |= split.check_images(allow_empty=True).images.shape[1:3] != (size, size)
                sources.check_labels(split.labels, len(dataset.classes), str(path))
            if not stale:
                return dataset
        except Exception:  # noqa: BLE001 - a damaged entry is rebuilt
            pass
        warn(f"cached arrays {path} are damaged or do not match their source; decoding the images again")
    dataset = build()

    def save():
        with atomic_write(path, "wb") as f:
            np.savez(f, key=key, source=dataset.source, classes=np.array(dataset.classes, str),
                     **{f"{name}_{k}": v for name, split in dataset.splits().items() for k, v in vars(split).items()})
    best_effort(save, f"writing the dataset cache {path}")
    return dataset


def load_dataset(data_dir=None, dataset: str = "auto", size: int = 32, classes=()) -> Dataset:
    """A dataset as uint8 arrays (sources: the module docstring), cached; `classes`: only these class names,
    relabelled in that order (`select_classes`)."""
    if not isinstance(size, int) or not 8 <= size <= 1024:
        raise UserError(f"image size must be an integer between 8 and 1024, got {size!r}")
    if dataset not in SOURCES:
        raise UserError(f"dataset must be one of {', '.join(SOURCES)}, got {dataset!r}")
    if dataset == "fake":
        return select_classes(_load_fake(size), classes)
    if data_dir is not None and not str(data_dir).strip():
        raise UserError("--data-dir is empty; pass the folder that holds your images")
    if dataset == "folder" and data_dir is None:
        raise UserError("--dataset folder needs --data-dir DIR (a folder with DIR/train/<class>/*.jpg)")
    root = Path(data_dir).expanduser() if data_dir is not None else cache_dir() / "cifar10"
    folder = root if root.name == sources.CIFAR_DIR else root / sources.CIFAR_DIR
    try:
        if dataset == "cifar10" or (dataset == "auto" and data_dir is None):
            loaded = _load_cifar(folder if (folder / "batches.meta").is_file() else _download_cifar10(root), size)
            return select_classes(loaded, classes)
        try:
            root.stat()  # not exists(), which says False for a symbolic link loop: that is an OSError below
        except FileNotFoundError:
            raise UserError(f"data folder {root} does not exist; pass --data-dir with a folder holding "
                            f"{sources.CIFAR_DIR} or DIR/train/<class>/*.jpg") from None
        if not root.is_dir():
            raise UserError(_archive_advice(root) or f"{root} is a file, not a data folder; pass the folder that "
                            "holds it")
        loaded = _load_cifar(folder, size) if dataset == "auto" and folder.is_dir() else _load_folder(root, size)
    except OSError as error:
        raise user_error_from_os(error, f"cannot read the data in {root}") from None
    return select_classes(loaded, classes)


_UNPACK = {".zip": "unzip {} -d DIR", ".tar.gz": "tar xzf {} -C DIR", ".tgz": "tar xzf {} -C DIR",
           ".tar": "tar xf {} -C DIR", ".tar.bz2": "tar xjf {} -C DIR", ".tar.xz": "tar xJf {} -C DIR"}


def _archive_advice(path: Path) -> Optional[str]:
    """How to unpack an archive passed as the data folder, and the folder it unpacks into; None for other files."""
    name = path.name.lower()
    command = next((c for ext, c in _UNPACK.items() if name.endswith(ext)), None)
    if command is None:
        return None
    try:
        if name.endswith(".zip"):
            with zipfile.ZipFile(path) as z:
                first = next(iter(z.namelist()), "")
        else:
            with tarfile.open(path) as t:
                member = t.next()
                first = "" if member is None else member.name + "/" * member.isdir()
    except Exception:  # noqa: BLE001 - a damaged archive still gets the unpacking advice
        first = ""
    parts = [p for p in first.split("/") if p not in ("", ".")]
    inner = parts[0] if parts and (first.endswith("/") or len(parts) > 1) else None
    return (f"{path} is an archive; unpack it first ({command.format(shlex.quote(str(path)))}), then pass "
            f"--data-dir {'DIR/' + inner if inner else 'DIR (or the folder it unpacked into)'}")


def describe(dataset: Dataset, val_fraction: float = 0.2, seed: int = 0) -> dict:
    """Source, classes and per-split image counts (train/val from the seeded split; test if present)."""
    def counts(labels):
        per_class = np.bincount(labels, minlength=len(dataset.classes)) if len(labels) else np.zeros(0, int)
        return {"n": int(len(labels)), "per_class": {c: int(n) for c, n in zip(dataset.classes, per_class)}}

    named = {"train_folder": dataset.train}
    if dataset.train is not None and len(dataset.train) >= 2:
        named["train"], named["val"] = train_val_split(dataset, val_fraction, seed)
    named["test"] = dataset.test
    splits = {name: counts(split.labels) for name, split in named.items() if split is not None}
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
    dataset = load_dataset(args.data_dir, args.dataset, args.decode_size, args.classes)
    unused = []
    if dataset.source == "folder":
        _folder_splits(Path(args.data_dir).expanduser(), unused)
    print(json.dumps({**describe(dataset, args.val_fraction, args.seed), "unused_entries": unused}))


if __name__ == "__main__":
    main()
