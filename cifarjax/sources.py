"""Image files and CIFAR-10's python batches read into uint8 RGB arrays; a file that is malformed (an image mode with
no 8-bit RGB, over Pillow's pixel limit, a batch holding non-numpy objects or bad fields) is refused by name."""
from __future__ import annotations

import hashlib
import itertools
import os
import pickle
import stat
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
from PIL import Image
from tqdm import tqdm

from cifarjax.errors import UserError, user_error_from_os, warn
from cifarjax.text import printable

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
CIFAR_DIR = "cifar-10-batches-py"


def _scan(folder):
    try:
        return [e for e in sorted(os.scandir(folder), key=lambda e: e.name) if not e.name.startswith(".")]
    except OSError as error:
        raise user_error_from_os(error, f"cannot list the data folder {folder}") from None


def class_files(split_dir: Path, unused: Optional[list] = None):
    """(classes, paths, labels) of DIR/<class>/*, paths as os.scandir joins them (a Path per file costs seconds).
    Empty class folders are skipped with a warning, other unused entries (not hidden ones) with one (into `unused`)."""
    classes, paths, labels, skipped = [], [], [], []
    for entry in _scan(split_dir):
        if not entry.is_dir():
            skipped.append(entry.path)
            continue
        entries = _scan(entry.path)
        is_image = [e.is_file() and e.name.lower().endswith(IMAGE_EXTENSIONS) for e in entries]
        images = list(itertools.compress(entries, is_image))
        skipped += [e.path for e, used in zip(entries, is_image) if not used]
        if not images:
            warn(f"class folder {entry.path} holds no images ({', '.join(IMAGE_EXTENSIONS)}); it is skipped and "
                 "is not a class")
            continue
        paths += [e.path for e in images]
        labels += [len(classes)] * len(images)
        classes.append(printable(entry.name))  # a name that is not UTF-8 is shown escaped everywhere
    if skipped:
        n, more = len(skipped), f" and {len(skipped) - 3} more" if len(skipped) > 3 else ""
        warn(f"{n} {'entry' if n == 1 else 'entries'} in {printable(str(split_dir))} {'is' if n == 1 else 'are'} "
             f"not used (not image files, broken links, special files or folders): "
             f"{', '.join(map(printable, skipped[:3]))}{more}; python -m cifarjax.data lists them all")
    if unused is not None:
        unused += skipped
    return classes, paths, labels


def content_digest(paths, names=None) -> str:
    """A SHA-256 of each file's name (`names`) and its bytes' SHA-256, in order (not sizes or times); raw reads."""
    digest, buffer = hashlib.sha256(), bytearray(1 << 16)  # under malloc's mmap threshold; a JPEG fits
    view = memoryview(buffer)
    for i, path in enumerate(paths):
        fd = os.open(path, os.O_RDONLY)
        try:
            content, n = hashlib.sha256(), len(buffer)
            while n == len(buffer):  # a filled buffer: there may be more (a short read is a regular file's end)
                n = os.readv(fd, [buffer])
                content.update(view[:n])
        finally:
            os.close(fd)
        digest.update(b"%s\0%s" % (b"" if names is None else os.fsencode(names[i]), content.digest()))
    return digest.hexdigest()


def to_rgb8(image) -> np.ndarray:
    """A Pillow image of any mode as (H, W, 3) uint8 RGB: 16-bit images scaled from [0, 65535]; 32-bit integer and
    float ones read as 8-bit where they fit [0, 255] (floats in [0, 1] scaled), else as 16-bit, else refused."""
    mode = image.mode
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        values = np.asarray(image, dtype=np.float64)
        if values.size == 0 or not np.isfinite(values).all():
            raise ValueError(f"mode {mode} image with non-finite values")
        lo, hi = float(values.min()), float(values.max())
        if lo < 0 or hi > 65535:
            raise ValueError(f"mode {mode} image with values in [{lo:g}, {hi:g}], outside 8- or 16-bit ranges")
        eight_bit = hi <= 255 and not mode.startswith("I;16")
        scale = 255.0 if mode == "F" and hi <= 1 else 1.0 if eight_bit else 255.0 / 65535.0
        gray = np.clip(np.rint(values * scale), 0, 255).astype(np.uint8)
        return np.repeat(gray[..., None], 3, axis=-1)
    if mode in ("LA", "La", "PA", "RGBa"):
        image = image.convert("RGBA")  # then RGB: alpha is dropped, as torchvision's loader does
    return np.asarray(image.convert("RGB"), dtype=np.uint8)  # Pillow refuses modes it cannot convert


def resized(rgb: np.ndarray, size: int) -> np.ndarray:
    """(H, W, 3) uint8 at (size, size, 3), by Pillow's bilinear resize where the size differs."""
    if rgb.shape[:2] == (size, size):
        return rgb
    return np.asarray(Image.fromarray(rgb).resize((size, size), Image.BILINEAR), dtype=np.uint8)


def decode_image(path, size: int, advice: str = "delete or replace that file and run again",
                 missing: str = "check the path") -> np.ndarray:
    """One image file as (size, size, 3) uint8 RGB, or a UserError naming it and `advice` (`missing` when there is
    no such file). Only a regular file is opened (a FIFO would block forever)."""
    try:
        if stat.S_ISREG(os.stat(path).st_mode):
            with Image.open(path) as image:
                image.seek(0)
                return resized(to_rgb8(image), size)
    except FileNotFoundError:
        raise UserError(f"image {path} does not exist; {missing}") from None
    except Exception as error:  # noqa: BLE001 - PIL raises many types for a bad file
        raise UserError(f"cannot read image {path} ({type(error).__name__}: {error}); {advice}") from None
    raise UserError(f"image {path} is not a regular file (a FIFO, a socket, a device or a folder); {advice}")


def decode_files(paths: Sequence, size: int, desc: Optional[str] = None, skip_unreadable: bool = False):
    """((N, size, size, 3) uint8 images, the paths read) of image files, decoded on a thread pool (with `desc`, under a
    progress bar); an unreadable file raises UserError, or with `skip_unreadable` is left out with a warning."""
    images, read = np.empty((len(paths), size, size, 3), np.uint8), np.ones(len(paths), bool)

    def work(i):
        try:
            images[i] = decode_image(Path(paths[i]), size, *(["it is skipped"] * 2 if skip_unreadable else []))
        except UserError as error:
            if not skip_unreadable:
                raise
            warn(str(error))
            read[i] = False

    with warnings.catch_warnings(), ThreadPoolExecutor(max(2, os.cpu_count() or 1)) as pool:
        # Pillow's DecompressionBombWarning refuses such an image as a corrupt one is (set by the thread that starts
        # the pool, as warning filters are the process's, and racy)
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        for _ in tqdm(pool.map(work, range(len(paths))), total=len(paths), desc=desc, unit="img",
                      leave=False, mininterval=1.0, disable=desc is None or len(paths) < 2000):
            pass
    return (images, list(paths)) if read.all() else (images[read], [p for p, r in zip(paths, read) if r])


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """CIFAR-10's python batches hold dicts of lists and numpy arrays; nothing else may be unpickled."""
    ALLOWED = {("numpy", "ndarray"), ("numpy", "dtype"),
               *itertools.product(("numpy.core.multiarray", "numpy._core.multiarray"), ("_reconstruct", "scalar"))}

    def find_class(self, module, name):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


_REDOWNLOAD = "download CIFAR-10 again (python version)"


def _read_cifar_pickle(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            value = _NumpyOnlyUnpickler(f, encoding="latin1").load()
    except FileNotFoundError:
        raise UserError(f"{path} is missing: a {CIFAR_DIR} folder needs data_batch_1..5, test_batch and "
                        f"batches.meta; {_REDOWNLOAD}") from None
    except OSError as error:
        raise user_error_from_os(error, f"cannot read {path}") from None
    except Exception as error:  # noqa: BLE001
        raise UserError(f"{path} is not a CIFAR-10 python batch ({type(error).__name__}); {_REDOWNLOAD}") from None
    if not isinstance(value, dict):
        raise UserError(f"{path} holds a {type(value).__name__}, not a CIFAR-10 batch dict; {_REDOWNLOAD}")
    return value


def read_cifar(folder: Path, size: int):
    """(classes, train, test) of a cifar-10-batches-py folder, each split (images, labels), every batch checked."""
    classes = _read_cifar_pickle(folder / "batches.meta").get("label_names")
    if not isinstance(classes, (list, tuple)) or not classes or not all(isinstance(n, str) for n in classes):
        raise UserError(f"{folder / 'batches.meta'} has no list of class names ('label_names'); {_REDOWNLOAD}")
    splits = {"train": [], "test": []}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        path = folder / name
        batch = _read_cifar_pickle(path)
        if missing := [k for k in ("data", "labels") if k not in batch]:
            raise UserError(f"{path} lacks the key(s) {', '.join(missing)} of a CIFAR-10 batch; {_REDOWNLOAD}")
        data, labels = batch["data"], batch["labels"]
        if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
            what = f"{data.dtype} array of shape {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
            raise UserError(f"{path}: 'data' is a {what}, CIFAR-10 needs uint8 of shape (N, 3072); {_REDOWNLOAD}")
        try:
            labels = np.asarray(labels)
        except Exception:  # noqa: BLE001 - a ragged list
            labels = np.asarray([], object)
        if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
            raise UserError(f"{path}: 'labels' is not a list of integers; {_REDOWNLOAD}")
        if len(labels) != len(data):
            raise UserError(f"{path} holds {len(data)} images but {len(labels)} labels; {_REDOWNLOAD}")
        check_labels(labels, len(classes), str(path))
        images = np.ascontiguousarray(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        splits["test" if name == "test_batch" else "train"].append(
            (np.stack([resized(im, size) for im in images]) if size != 32 else images, labels.astype(np.int32)))
    return (tuple(classes), *(tuple(map(np.concatenate, zip(*batches))) for batches in splits.values()))


def check_labels(labels: np.ndarray, num_classes: int, where: str) -> None:
    """Refuse labels outside [0, num_classes) before they can become a NaN loss."""
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        bad = labels[(labels < 0) | (labels >= num_classes)]
        raise UserError(f"{where}: {len(bad)} label(s) outside [0, {num_classes}) (for example {int(bad[0])}); "
                        "fix the labels or the number of classes")
